"""svd-serve: SVD-family adapters from training to multi-adapter serving."""

__version__ = "0.1.0"
