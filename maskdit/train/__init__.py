"""Training: the config, the loop (masked pretraining and unmasking tuning), warm starts, monitoring."""
