"""The method of the paper: the MaskDiT network, EDM diffusion (preconditioning, loss, sampler), checkpoints,
a registered model's files."""
