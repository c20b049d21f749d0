"""What travels through a pipeline (:class:`ModelState`) and what a stage may use (:class:`RunContext`)."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchshrink.data import DatasetBundle
from torchshrink.inputs import ModelInput, take
from torchshrink.parallel.ddp import DistInfo

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelState:
    """The model between stages, plus what stages attach to it.

    ``architecture`` rebuilds the module (None when it came from a file that cannot be rebuilt);
    ``artefact`` is the file a user would ship for this state when a stage wrote one (its size is
    what the report counts); ``attachments`` holds JSON-able facts later stages or the report need;
    ``lineage`` lists the stages applied so far; ``runtime``, when set, is what executes the
    artefact (e.g. ONNX Runtime on an int8 file): accuracy and latency are measured on it;
    ``pruned_weights`` names the parameters whose zeros training must keep.
    """

    model: nn.Module
    architecture: dict[str, Any] | None
    artefact: Path | None = None
    attachments: dict[str, Any] = field(default_factory=dict)
    lineage: tuple[str, ...] = ()
    runtime: nn.Module | None = None
    pruned_weights: tuple[str, ...] = ()
    """Parameters unstructured pruning zeroed: training keeps them at zero (a mask keeper)."""

    def replace(self, **changes: Any) -> ModelState:
        """A copy with some fields changed: stages return new states instead of mutating.

        A new ``artefact`` without a ``runtime`` drops the old runtime: it ran the old file.
        """
        if "artefact" in changes and "runtime" not in changes:
            changes["runtime"] = None
        return dataclasses.replace(self, **changes)


@dataclass
class RunContext:
    """What a stage may read or write while it runs: data, output folder, seed and its own work folder."""

    data: DatasetBundle
    out_dir: Path
    seed: int
    stage_index: int
    stage_name: str
    fingerprint: str = ""
    dist: DistInfo = field(default_factory=DistInfo)
    details: dict[str, Any] = field(default_factory=dict)
    artefacts: dict[str, str] = field(default_factory=dict)
    baseline: nn.Module | None = None
    """The model every ratio is taken against (as loaded, or as the last reference stage left it):
    what "distill back from the original" learns from. Read it, never train it."""

    def warn(self, message: str) -> None:
        """A setting known to hurt, or a result to distrust: logged now, and listed under the stage in
        report.json (``details.warnings``) and in report.md's warnings."""
        log.warning("%s: %s", self.stage_name, message)
        self.details.setdefault("warnings", []).append(message)

    @property
    def work_dir(self) -> Path:
        """A folder private to this stage (training checkpoints live here, so resume finds them)."""
        return self.out_dir / ".work" / f"{self.stage_index:02d}-{self.stage_name}"

    @property
    def cache_dir(self) -> Path:
        """Results worth reusing across runs into the same output folder (e.g. a trained teacher)."""
        return self.out_dir / "cache"

    def calibration_batches(self, batches: int, batch_size: int) -> list[tuple[ModelInput, torch.Tensor]]:
        """Labelled training batches for calibration and importance scores, the same for the same seed."""
        subset = self.data.subset("train", batches * batch_size, seed=self.seed)
        x, y = subset.tensors[0], subset.tensors[1]
        return [
            (take(x, slice(i, i + batch_size)), y[i : i + batch_size]) for i in range(0, len(y), batch_size)
        ]
