"""scanfit: a whole JAX training loop as one XLA program, with jax.lax.scan."""

from scanfit._errors import CheckpointLockedError as CheckpointLockedError
from scanfit._errors import CheckpointMismatchError as CheckpointMismatchError
from scanfit._errors import CheckpointWarning as CheckpointWarning
from scanfit._errors import CheckpointWriteError as CheckpointWriteError
from scanfit._errors import DataExhaustedError as DataExhaustedError
from scanfit._errors import DivergenceError as DivergenceError
from scanfit._errors import Preempted as Preempted
from scanfit._fit import ChunkInfo as ChunkInfo
from scanfit._fit import fit as fit
from scanfit._fit_steps import fit_steps as fit_steps
from scanfit._linear import scan_training_step as scan_training_step
from scanfit._load import Checkpoint as Checkpoint
from scanfit._load import load as load
from scanfit._loop import TrainResult as TrainResult
from scanfit._loop import scan_train as scan_train
from scanfit._steps import StepsResult as StepsResult
from scanfit._steps import scan_steps as scan_steps
from scanfit._sweep import grid as grid
from scanfit._sweep import rank as rank
from scanfit._sweep import sweep as sweep

__version__ = "0.1.0"

__all__ = [
    "CheckpointLockedError",
    "CheckpointMismatchError",
    "CheckpointWarning",
    "CheckpointWriteError",
    "Checkpoint",
    "ChunkInfo",
    "DataExhaustedError",
    "DivergenceError",
    "Preempted",
    "StepsResult",
    "TrainResult",
    "fit",
    "fit_steps",
    "grid",
    "load",
    "rank",
    "scan_steps",
    "scan_train",
    "scan_training_step",
    "sweep",
]
