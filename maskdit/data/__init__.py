"""Data: images in, VAE latents (or pixels) out as checksummed shards, and their identity."""
