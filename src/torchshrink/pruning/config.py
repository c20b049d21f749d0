"""Options of the ``prune`` stage: the shared part, then the unstructured and the structured parts.

A recipe writes them flat (``prune: {granularity: structured, macs_reduction: 2}``); ``granularity``
picks which part validates them, so a key of the other part is refused by name.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Discriminator, Field, RootModel, Tag, model_validator

__all__ = [
    "ScheduleConfig",
    "L1Config",
    "PruneOptions",
    "UnstructuredPruneConfig",
    "StructuredPruneConfig",
    "PruneConfig",
]


class ScheduleConfig(BaseModel, extra="forbid"):
    """How the target is approached: at once, in equal steps, or on the AGP cubic curve."""

    kind: Literal["oneshot", "linear", "agp"] = "oneshot"
    steps: int = Field(1, ge=1)
    epochs_between: int = Field(1, ge=0, description="fine-tuning epochs after every step but the last")

    @model_validator(mode="after")
    def _steps(self) -> ScheduleConfig:
        if self.kind == "oneshot" and self.steps != 1:
            raise ValueError("schedule kind 'oneshot' has exactly 1 step; use 'linear' or 'agp' for more")
        return self


class L1Config(BaseModel, extra="forbid"):
    """Sparsity-inducing training before pruning: loss + weight * sum|W| (or sum|gamma| of batch-norms)."""

    weight: float = Field(..., gt=0)
    epochs: int = Field(..., ge=1)
    target: Literal["weights", "bn"] = "weights"
    lr: float = Field(1e-3, gt=0)


class PruneOptions(BaseModel, extra="forbid"):
    """What both granularities share: scores, scope, schedule, fine-tuning between steps."""

    scope: Literal["global", "layer"] = "global"
    importance: Literal["magnitude", "taylor", "snip", "entropy", "random", "bn_scale"] = "magnitude"
    norm: Literal["l1", "l2"] = "l1"
    sparsity: float | None = Field(
        None, gt=0, lt=1, description="fraction of weights (unstructured) or parameters (structured) removed"
    )
    ignore: list[str] = Field(default_factory=list, description="layer names never pruned")
    calibration_batches: int = Field(8, ge=1, description="batches for taylor / snip / entropy scores")
    batch_size: int = Field(64, ge=1)
    schedule: ScheduleConfig = ScheduleConfig()
    finetune_lr: float = Field(3e-4, gt=0, description="learning rate of the fine-tuning between steps")
    l1_regularization: L1Config | None = None

    @model_validator(mode="before")
    @classmethod
    def _keys_of_the_other_part(cls, data: Any) -> Any:
        """A key that only the other granularity takes gets a message naming the granularity."""
        if isinstance(data, dict):
            own = set(cls.model_fields)
            other = StructuredPruneConfig if cls is UnstructuredPruneConfig else UnstructuredPruneConfig
            misplaced = sorted(k for k in data if k not in own and k in other.model_fields)
            if misplaced:
                raise ValueError(
                    f"{', '.join(misplaced)} applies to granularity: {other.model_fields['granularity'].default} "
                    f"(this stage is {cls.model_fields['granularity'].default})"
                )
        return data

    def layer_names(self) -> dict[str, list[str]]:
        """Layer names this config refers to (checked against the model before any stage runs)."""
        return {"ignore": list(self.ignore)}


class UnstructuredPruneConfig(PruneOptions):
    """Masks on single weights (``W * mask``); the target is a weight sparsity."""

    granularity: Literal["unstructured"] = "unstructured"
    min_density: float = Field(0.02, ge=0, lt=1, description="every layer keeps at least this fraction")

    @property
    def targets(self) -> list[str]:
        return ["sparsity"]

    @model_validator(mode="after")
    def _target(self) -> UnstructuredPruneConfig:
        if self.sparsity is None:
            raise ValueError(
                "unstructured pruning takes a 'sparsity' target (macs/params reductions and speedup need "
                "granularity: structured)"
            )
        if self.importance == "bn_scale":
            raise ValueError(
                "importance 'bn_scale' scores channels (batch-norm scales): use granularity: structured"
            )
        return self


class StructuredPruneConfig(PruneOptions):
    """Channels, neurons, heads and layers removed, so the model gets smaller and faster. Give
    exactly one target (or ``drop_layers`` alone)."""

    granularity: Literal["structured"] = "structured"
    macs_reduction: float | None = Field(None, gt=1, description="MACs before / after")
    speedup: float | None = Field(
        None,
        gt=1,
        description="batch-32 latency before / after, as predicted by a latency model fitted by timing "
        "shrunken copies on this machine (the stage then times the result and reports both)",
    )
    params_reduction: float | None = Field(None, gt=1, description="parameters before / after")
    max_channel_ratio: float = Field(0.9, gt=0, lt=1, description="at most this fraction of a group goes")
    max_channel_ratio_residual: float = Field(
        0.5, gt=0, lt=1, description="models with residual adds: at most this fraction of any group goes"
    )
    allocation: Literal["sensitivity", "ranking"] | None = Field(
        None,
        description="global scope: how many channels each group loses; 'sensitivity' (the default) "
        "measures the calibration loss of each candidate removal, 'ranking' compares normalised scores "
        "across groups",
    )
    allocation_cost: Literal["macs", "params", "latency"] | None = Field(
        None,
        description="sensitivity allocation: what a removal's loss rise is divided by; default MACs for a "
        "macs_reduction target, parameters otherwise; 'latency' fits a latency model of this network on "
        "this machine (batch 32) and prefers the channels that cost more time than their MACs show",
    )
    cost_aware: bool = Field(True, description="allocation 'ranking': rank channels by importance per MAC")
    drop_layers: int = Field(
        0,
        ge=0,
        description="transformers: remove this many encoder layers first, the least harmful by measured "
        "loss; with a target, channels, heads and neurons then go until it holds",
    )
    allow_partial: bool = Field(
        False,
        description="accept a model short of the target (or unchanged, when nothing is prunable) instead "
        "of stopping with an error",
    )

    @property
    def targets(self) -> list[str]:
        """The size / speed targets given (drop_layers aside)."""
        keys = ("sparsity", "macs_reduction", "params_reduction", "speedup")
        return [k for k in keys if getattr(self, k) is not None]

    @property
    def sensitivity_allocation(self) -> bool:
        return self.scope == "global" and self.allocation != "ranking"

    @property
    def cost(self) -> Literal["macs", "params", "latency"]:
        """What the sensitivity allocation divides a loss rise by (the option, or the target's unit)."""
        if self.allocation_cost is not None:
            return self.allocation_cost
        if self.speedup is not None:
            return "latency"
        return "macs" if self.macs_reduction is not None else "params"

    @model_validator(mode="after")
    def _one_target(self) -> StructuredPruneConfig:
        targets = self.targets
        if len(targets) > 1 or (not targets and not self.drop_layers):
            raise ValueError(
                "give exactly one of sparsity, macs_reduction, params_reduction, speedup (or drop_layers "
                f"alone); got {targets or 'none'}"
            )
        if self.allocation is not None and self.scope != "global":
            raise ValueError("'allocation' applies to structured pruning with scope: global")
        if self.allocation_cost is not None and not self.sensitivity_allocation:
            raise ValueError(
                "'allocation_cost' applies to the sensitivity allocation (structured, scope: global, "
                "allocation: sensitivity)"
            )
        return self


def _granularity(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("granularity", "unstructured"))
    return str(getattr(value, "granularity", "unstructured"))


class PruneConfig(
    RootModel[
        Annotated[
            Annotated[UnstructuredPruneConfig, Tag("unstructured")]
            | Annotated[StructuredPruneConfig, Tag("structured")],
            Discriminator(_granularity),
        ]
    ]
):
    """The ``prune`` stage's options: the part its ``granularity`` names (``root``)."""

    @classmethod
    def members(cls) -> dict[str, type[BaseModel]]:
        """Granularity -> the config class validating it (for error messages)."""
        return {"unstructured": UnstructuredPruneConfig, "structured": StructuredPruneConfig}

    def layer_names(self) -> dict[str, list[str]]:
        return self.root.layer_names()
