"""neuralign: optimisation over permutations and curves for neuron alignment and mode connectivity."""

from __future__ import annotations

from neuralign import errors

__version__ = "0.1.0"

__all__ = ["errors", "__version__"]
