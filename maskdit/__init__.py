"""MaskDiT: fast training of diffusion models with masked transformers."""

__version__ = "0.1.0"
