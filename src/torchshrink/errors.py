"""The one exception hierarchy of torchshrink.

Every error a user can cause derives from :class:`TorchshrinkError`, and its message says what
was wrong (which file, key, layer or shape) and what to do about it. The CLI prints the message
without a traceback and exits with status 2.
"""

from __future__ import annotations

from pathlib import Path


class TorchshrinkError(Exception):
    """Base class of every error torchshrink raises on purpose."""


class RecipeError(TorchshrinkError, ValueError):
    """A recipe (YAML or dict) is malformed: names the key path, the value and what is allowed."""


class UnknownStageError(RecipeError):
    """A recipe names a stage kind that no handler is registered for."""


class ModelLoadError(TorchshrinkError):
    """A model could not be built or its weights could not be loaded."""


class UntrustedPickleError(ModelLoadError):
    """A file holds a pickled object whose loading could execute code."""


class DataError(TorchshrinkError, ValueError):
    """A dataset is missing, malformed or incompatible."""


class ShapeMismatchError(TorchshrinkError, ValueError):
    """A model and its data (or two models) disagree on a shape."""


class TrainingError(TorchshrinkError, RuntimeError):
    """Training cannot go on (for example the loss became NaN)."""


class ExportError(TorchshrinkError, RuntimeError):
    """Export failed, or the exported model does not match PyTorch."""


class StructureError(TorchshrinkError):
    """A model cannot be traced or analysed (structured pruning, quantization placement)."""


class QuantizationError(TorchshrinkError, ValueError):
    """A model or setting cannot be quantized as asked (names the layer and the fix)."""


class EncodeError(TorchshrinkError, ValueError):
    """Weight sharing or packing cannot be done as asked: names the layer and what to change."""


class FileProblem(TorchshrinkError, OSError):
    """A file is missing, unreadable or corrupt; the message names the path."""

    def __init__(self, path: str | Path, problem: str, fix: str = "") -> None:
        self.path = Path(path)
        message = f"{self.path}: {problem}"
        if fix:
            message += f" ({fix})"
        super().__init__(message)


class MissingFileError(FileProblem, FileNotFoundError):
    """A file that should exist does not."""

    def __init__(self, path: str | Path, what: str = "file", fix: str = "") -> None:
        super().__init__(path, f"{what} not found", fix or "check the path")


class CorruptFileError(FileProblem):
    """A file exists but cannot be parsed as what it should be."""


class OutputPathError(FileProblem):
    """An output path that cannot be used: a file where a folder goes (or the reverse), under a file, or not writable."""
