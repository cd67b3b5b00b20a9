"""The typed errors a user can cause: the CLI prints them as one `error: ...` line."""

from __future__ import annotations

from export.bundle import OutputError
from export.load import CheckpointError
from export.processor import ImageProcessorError
from export.transformersjs import TransformersJsError
from export.vision import ExportValidationError
from runtime.bundle import BundleError
from runtime.mrope import PositionError
from runtime.preprocess import ImageError
from runtime.qwen_vision_inputs import GridError
from svdprune_onnx.qwen_vision import UnsupportedQwenError
from svdprune_onnx.select import PruneError
from svdprune_onnx.vision import UnsupportedModelError

USER_ERRORS = (
    CheckpointError,
    ImageProcessorError,
    ImageError,
    ExportValidationError,
    BundleError,
    PruneError,
    UnsupportedModelError,
    FileExistsError,
    OutputError,
    TransformersJsError,
    GridError,
    UnsupportedQwenError,
    PositionError,
)
