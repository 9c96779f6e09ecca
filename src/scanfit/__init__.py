"""scanfit: a whole JAX training loop as one XLA program, with jax.lax.scan."""

from scanfit._errors import DivergenceError as DivergenceError
from scanfit._linear import scan_training_step as scan_training_step

__version__ = "0.1.0"

__all__ = [
    "DivergenceError",
    "scan_training_step",
]
