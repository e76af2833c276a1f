"""Training: the config, the loop (masked pretraining and unmasking tuning), its steps and checkpoints, warm
starts, monitoring."""
