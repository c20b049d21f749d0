"""Training checkpoints: what :func:`torchshrink.train.fit` needs to resume bit-exactly (model,
optimizer, scheduler, RNG, position, loss sums), in the project's one file format: a safetensors
file whose tensors are every tensor of that state, with the rest as JSON in its metadata.

Reading never runs code (no pickle); a checkpoint written with other training settings is refused
with both settings named.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchshrink.errors import CorruptFileError, TrainingError
from torchshrink.io import load_tensors, read_safetensors_metadata, save_tensors

log = logging.getLogger(__name__)

__all__ = ["CHECKPOINT_NAME", "LoopState", "TrainCheckpoint", "pack_state", "unpack_state"]

CHECKPOINT_NAME = "train-state.safetensors"
PREVIOUS_NAME = "train-state.previous.safetensors"
FORMAT = "torchshrink-train-state"
_TENSOR = "__tensor__"  # {"__tensor__": key}: that tensor of the file
_PAIRS = "__pairs__"  # {"__pairs__": [[key, value], ...]}: a mapping with non-string keys (optimizer state)


def pack_state(obj: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """``obj`` (nested dicts, lists, tensors, numbers, strings) as a JSON-able skeleton and its tensors."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[path] = value
            return {_TENSOR: path}
        if isinstance(value, Mapping):
            if all(isinstance(k, str) and not k.startswith("__") for k in value):
                return {k: walk(v, f"{path}.{k}") for k, v in value.items()}
            return {_PAIRS: [[k, walk(v, f"{path}.{k}")] for k, v in value.items()]}
        if isinstance(value, (list, tuple)):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(value)]
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"a training checkpoint cannot hold a {type(value).__name__} (at {path})")

    return walk(obj, "state"), tensors


def unpack_state(skeleton: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """The inverse of :func:`pack_state` (tuples come back as lists)."""
    if isinstance(skeleton, dict):
        if set(skeleton) == {_TENSOR}:
            return tensors[skeleton[_TENSOR]]
        if set(skeleton) == {_PAIRS}:
            return {k: unpack_state(v, tensors) for k, v in skeleton[_PAIRS]}
        return {k: unpack_state(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [unpack_state(v, tensors) for v in skeleton]
    return skeleton


@dataclass
class LoopState:
    """Where the loop stood: the step, the running sums of the epoch it interrupted, the epochs'
    mean losses so far, and what the divergence and chance guards had seen."""

    step: int = 0
    epoch_sums: dict[str, float] = field(default_factory=dict)
    epoch_count: int = 0
    epoch_losses: list[dict[str, float]] = field(default_factory=list)
    first_loss: float | None = None
    opening: list[tuple[float, int]] = field(default_factory=list)


class TrainCheckpoint:
    """The checkpoint file of one ``fit`` call (in ``directory``; none when ``directory`` is None),
    valid only for the training settings ``settings``."""

    def __init__(
        self,
        directory: str | Path | None,
        settings: dict[str, Any],
        writer: bool = True,
        keep_previous: bool = False,
    ) -> None:
        self.path = Path(directory) / CHECKPOINT_NAME if directory is not None else None
        self.settings = settings
        self.writer = writer  # under torchrun only rank 0 writes
        # pipeline ranks each write their own stage: a kill between two ranks' saves leaves them one
        # save apart, so each keeps the save before too and they resume at the newest step all hold
        self.keep_previous = keep_previous

    @property
    def previous(self) -> Path | None:
        return self.path.with_name(PREVIOUS_NAME) if self.path is not None else None

    def steps(self) -> dict[int, Path]:
        """The steps this rank's checkpoint files stand at (the newest and, if kept, the one before)."""
        found = {}
        for path in (self.previous, self.path):
            if path is not None and path.is_file():
                meta = read_safetensors_metadata(path)
                try:
                    found[int(json.loads(meta["state"])["loop"]["step"])] = path
                except (KeyError, TypeError, ValueError, json.JSONDecodeError):
                    raise CorruptFileError(
                        path, "not a torchshrink training checkpoint", "delete it to start over"
                    ) from None
        return found

    def load(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None,
        path: Path | None = None,
    ) -> LoopState | None:
        """Restore model, optimizer, scheduler and RNG from the file (``path``: one of :meth:`steps`),
        if there is one; the loop state."""
        path = path or self.path
        if path is None or not path.is_file():
            return None
        meta = read_safetensors_metadata(path)
        if meta.get("format") != FORMAT or "state" not in meta:
            raise CorruptFileError(
                path, "not a torchshrink training checkpoint", "delete it to start over"
            ) from None
        state = unpack_state(json.loads(meta["state"]), load_tensors(path))
        if state["settings"] != json.loads(json.dumps(self.settings)):
            raise TrainingError(
                f"{path}: checkpoint was written with settings {state['settings']}, which differ from "
                f"{self.settings}; delete it to start over or restore the settings"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        loop = state["loop"]
        return LoopState(
            step=int(loop["step"]),
            epoch_sums=dict(loop["epoch_sums"]),
            epoch_count=int(loop["epoch_count"]),
            epoch_losses=[dict(e) for e in loop["epoch_losses"]],
            first_loss=loop["first_loss"],
            opening=[(float(a), int(n)) for a, n in loop["opening"]],
        )

    def save(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None,
        loop: LoopState,
    ) -> None:
        """Write the state atomically (a crash mid-write leaves the previous checkpoint)."""
        if self.path is None or not self.writer:
            return
        skeleton, tensors = pack_state(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else {},
                "rng": torch.get_rng_state(),
                "settings": self.settings,
                "loop": {
                    "step": loop.step,
                    "epoch_sums": loop.epoch_sums,
                    "epoch_count": loop.epoch_count,
                    "epoch_losses": loop.epoch_losses,
                    "first_loss": loop.first_loss,
                    "opening": loop.opening,
                },
            }
        )
        if self.keep_previous and self.path.is_file():
            self.path.replace(self.previous)  # type: ignore[arg-type]
        save_tensors(self.path, tensors, {"format": FORMAT, "state": json.dumps(skeleton)})

    def discard(self) -> None:
        """Remove the files once training has finished (the stage's result is what is kept)."""
        if self.path is not None and self.writer:
            for path in (self.path, self.previous):
                if path is not None and path.exists():
                    path.unlink()
