"""MaskDiT: fast training of diffusion models with masked transformers."""

from importlib import metadata

try:
    __version__ = metadata.version("maskdit")  # pyproject.toml's, the one place the version is written
except metadata.PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"
