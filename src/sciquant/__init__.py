"""sciquant: reproducible quantization studies of scientific ML surrogates."""

__version__ = "0.1.0"
