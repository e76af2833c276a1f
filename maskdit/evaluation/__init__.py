"""Evaluation: what to sample from, the sampler step, FID, the digit classifier, the evaluate step."""
