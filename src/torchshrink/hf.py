"""Hugging Face transformers models from a local directory, offline, wrapped so that they take the
inputs the data describes (``input_ids, attention_mask`` or ``pixel_values``) and return what the
task compares: a sentence embedding (mean pooling + L2 normalisation, as sentence-transformers does)
or class logits.

The architecture reference records the model's ``config.json`` contents and the task: data, not
code, so a saved model rebuilds from its own file (transformers builds the class that ``model_type``
names among its own; ``trust_remote_code`` is never set and nothing is downloaded).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from torchshrink.errors import ModelLoadError, ShapeMismatchError
from torchshrink.inputs import TEXT_INPUTS, InputSpec
from torchshrink.io import folder_listing

log = logging.getLogger(__name__)

Task = Literal["embedding", "sequence-classification", "image-classification"]
TASKS: tuple[str, ...] = get_args(Task)
WEIGHTS_FILE = "model.safetensors"

__all__ = ["TASKS", "Task", "build_hf", "open_hf", "read_config", "TextEmbedding", "Logits"]


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise ModelLoadError(
            "model.hf needs the transformers package: pip install 'torchshrink[hf]'"
        ) from exc
    return transformers


def read_config(directory: Path) -> dict[str, Any]:
    """The directory's ``config.json``, after checking that the files a model needs are there."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ModelLoadError(f"model.hf: {directory} is not a directory (a local transformers model folder)")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(
            f"model.hf: {directory} has no config.json; it holds {folder_listing(directory)}"
        )
    if not (directory / WEIGHTS_FILE).is_file():
        other = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.safetensors")]
        hint = (
            f" ({', '.join(other)} found: torchshrink reads only {WEIGHTS_FILE}, never pickled weights; "
            "convert them with transformers' save_pretrained(safe_serialization=True))"
            if other
            else ""
        )
        raise ModelLoadError(
            f"model.hf: {directory} has no {WEIGHTS_FILE}{hint}; it holds {folder_listing(directory)}"
        )
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"model.hf: {config_path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict) or "model_type" not in config:
        raise ModelLoadError(f"model.hf: {config_path} names no model_type")
    if config.get("auto_map"):
        log.info("model.hf: %s names custom code (auto_map); it is ignored, never run", config_path)
    return config


def _config_object(config: dict[str, Any]) -> Any:
    transformers = _transformers()
    fields = {
        k: v for k, v in config.items() if k not in ("auto_map", "_name_or_path", "transformers_version")
    }
    model_type = fields.pop("model_type")
    try:
        return transformers.AutoConfig.for_model(model_type, **fields)
    except (ValueError, KeyError) as exc:
        raise ModelLoadError(
            f"model.hf: model_type {model_type!r} is not one transformers {transformers.__version__} knows: {exc}"
        ) from exc


def _auto_class(task: str) -> Any:
    """The transformers auto class that builds a model for ``task``."""
    if task not in TASKS:
        raise ModelLoadError(f"model.hf: unknown task {task!r}; known: {', '.join(TASKS)}")
    transformers = _transformers()
    return {
        "embedding": transformers.AutoModel,
        "sequence-classification": transformers.AutoModelForSequenceClassification,
        "image-classification": transformers.AutoModelForImageClassification,
    }[task]


def check_text_inputs(config: Any, spec: InputSpec, source: str) -> None:
    """A named error unless ``spec`` is token ids + attention mask this text model can take: integer
    ids below its vocabulary size, no longer than its position table."""
    names = list(spec.names)
    if names != list(TEXT_INPUTS):
        raise ShapeMismatchError(
            f"{source}: a transformers text model takes inputs {list(TEXT_INPUTS)}; the data gives "
            f"{names} (give data.text with a tokenizer, or name the npz arrays so in data.inputs)"
        )
    ids = spec.fields[0]
    if not ids.is_integer:
        raise ShapeMismatchError(
            f"{source}: input 'input_ids' must be integer token ids; the data gives {ids.dtype} values"
        )
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and ids.shape and ids.shape[0] > positions:
        raise ShapeMismatchError(
            f"{source}: input 'input_ids' has {ids.shape[0]} tokens per text but the model has "
            f"{positions} positions: set data.max_length <= {positions}"
        )
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and ids.high is not None and ids.high > vocab:
        raise ShapeMismatchError(
            f"{source}: input 'input_ids' holds ids up to {ids.high - 1} but the model's vocabulary has "
            f"{vocab} entries: the tokenizer does not belong to this model"
        )


class TextEmbedding(nn.Module):
    """A text encoder's last hidden states averaged over the attention mask and L2-normalised."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def check_inputs(self, spec: InputSpec, source: str) -> None:
        """Named errors for inputs this model cannot take (called before it runs on them)."""
        check_text_inputs(self.encoder.config, spec, source)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1)


class Logits(nn.Module):
    """A classification model's logits, from token ids + mask or from pixel values."""

    def __init__(self, classifier: nn.Module, text: bool) -> None:
        super().__init__()
        self.classifier = classifier
        self.text = text

    def check_inputs(self, spec: InputSpec, source: str) -> None:
        """Named errors for inputs this model cannot take (called before it runs on them)."""
        if self.text:
            check_text_inputs(self.classifier.config, spec, source)
        elif len(spec.fields) != 1 or spec.fields[0].is_integer:
            raise ShapeMismatchError(
                f"{source}: an image classifier takes one float input (pixel values); the data gives "
                f"{spec.describe()}"
            )

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.text:
            input_ids, attention_mask = inputs
            return self.classifier(input_ids=input_ids, attention_mask=attention_mask).logits
        (pixel_values,) = inputs
        return self.classifier(pixel_values=pixel_values).logits


def _wrap(model: nn.Module, task: str) -> nn.Module:
    model.float().eval()  # a float16 / bfloat16 checkpoint computes (and is rebuilt) in float32
    if task == "embedding":
        if getattr(model, "pooler", None) is not None:
            model.pooler = None  # the [CLS] pooler's output is not the embedding: no dead weights or work
        return TextEmbedding(model).eval()
    return Logits(model, text=task == "sequence-classification").eval()


def build_hf(config: dict[str, Any], task: str) -> nn.Module:
    """An untrained model of this config and task (weights are loaded afterwards)."""
    model = _auto_class(task).from_config(_config_object(config), attn_implementation="eager")
    return _wrap(model, task)


def open_hf(directory: Path, task: str) -> tuple[nn.Module, dict[str, Any]]:
    """The model in ``directory`` with its weights, and the architecture reference that rebuilds it.

    Attention is the eager implementation, so that ONNX Runtime's transformer fusions find it.
    """
    read_config(directory)  # named errors for a folder that lacks what a model needs
    auto = _auto_class(task)
    try:
        model = auto.from_pretrained(
            str(directory),
            local_files_only=True,
            use_safetensors=True,
            trust_remote_code=False,
            attn_implementation="eager",
        )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(f"model.hf: {directory} does not load as a {task} model: {exc}") from exc
    saved = json.loads(model.config.to_json_string(use_diff=False))
    for key in ("_attn_implementation_autoset", "dtype", "torch_dtype"):  # built in float32, see _wrap
        saved.pop(key, None)
    return _wrap(model, task), {"hf": {"config": saved, "task": task}}
