"""The version of neuralign (read by the package, manifests and permutation files without importing the package)."""

__version__ = "0.2.0"
