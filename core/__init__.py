"""rnnserve.core: recurrent models from one-timestep Keras graphs, and their serving view.

Pure Keras 3 + numpy: nothing here imports grpc, redis or asyncio.
"""

from rnnserve.core._container import RecurrentCell, RecurrentModel
from rnnserve.core._convert import ConversionError, from_keras
from rnnserve.core._graph import StepLayout
from rnnserve.core._sequential import RecurrentSequential
from rnnserve.core._signature import StepSignature, TensorSpec
from rnnserve.core._step import StepFunction, bucket_sizes, set_compute_threads, step_signature

__all__ = [
    "ConversionError",
    "RecurrentCell",
    "RecurrentModel",
    "RecurrentSequential",
    "StepFunction",
    "StepLayout",
    "StepSignature",
    "TensorSpec",
    "bucket_sizes",
    "from_keras",
    "set_compute_threads",
    "step_signature",
]
