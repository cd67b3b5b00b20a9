"""The typed errors a user can cause in `python -m eval`: printed as one `error: ...` line.

Exports run in a subprocess (their errors arrive as ExportFailedError), so the export package's
heavy error modules are not imported here.
"""

from __future__ import annotations

from eval.answers import AnswerError
from eval.bundles import BundleMismatchError, ExportFailedError
from eval.cache import CacheError
from eval.pope import DataError
from export.load import CheckpointError
from runtime.bundle import BundleError
from runtime.generate import PromptError
from runtime.mrope import PositionError
from runtime.preprocess import ImageError
from runtime.qwen_vision_inputs import GridError
from runtime.session import ProviderError
from svdprune_onnx.select import PruneError
from svdprune_onnx.vision import UnsupportedModelError


class EvalArgError(ValueError):
    """A bad command-line value; the message names the flag."""


USER_ERRORS = (
    AnswerError,
    BundleError,
    BundleMismatchError,
    CacheError,
    CheckpointError,
    DataError,
    EvalArgError,
    ExportFailedError,
    GridError,
    ImageError,
    PositionError,
    PromptError,
    ProviderError,
    PruneError,
    UnsupportedModelError,
)
