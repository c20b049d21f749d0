"""The space a search explores: compression plans (structured MACs reduction, unstructured
sparsity, static quantization bits, Deep-Compression bits, distillation back from the input model)
and the recipe stages that build each one."""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

__all__ = ["SearchSpace", "Plan", "plans"]

QuantizeKind = Literal["static", "qat", "mixed"]


def _unique(values: list[Any]) -> list[Any]:
    return list(dict.fromkeys(values))


class SearchSpace(BaseModel, extra="forbid"):
    """The values each knob may take; a plan picks one of each. ``1`` (MACs), ``0`` (sparsity) and
    ``null`` (bits) mean "not applied"."""

    macs_reduction: list[float] = Field(
        default_factory=lambda: [1.0, 1.5, 2.0, 3.0], description="structured pruning: MACs before / after"
    )
    sparsity: list[float] = Field(default_factory=lambda: [0.0], description="unstructured: share of zeros")
    bits: list[int | None] = Field(
        default_factory=lambda: [None, 8],
        description="static quantization of weights and activations (8: int8 on ONNX Runtime)",
    )
    quantize: list[QuantizeKind] = Field(
        default_factory=lambda: ["static"],
        description="how a plan with bits quantizes: static (post-training), qat (trained with fake-quant), "
        "mixed (static, the fewest layers left float so that quantizing loses at most max_drop)",
    )
    encode_bits: list[int | None] = Field(
        default_factory=lambda: [None], description="Deep-Compression weight-sharing bits (packed file)"
    )
    distill: list[bool] = Field(
        default_factory=lambda: [False],
        description="after pruning, distil back from the input model instead of fine-tuning on labels",
    )

    @field_validator("macs_reduction", "sparsity", "bits", "quantize", "encode_bits", "distill")
    @classmethod
    def _not_empty(cls, values: list[Any], info: Any) -> list[Any]:
        if not values:
            raise ValueError(
                f"{info.field_name}: an empty list leaves nothing to search; give at least one value"
            )
        return _unique(values)

    @model_validator(mode="after")
    def _ranges(self) -> SearchSpace:
        for r in self.macs_reduction:
            if r < 1:
                raise ValueError(
                    f"macs_reduction: {r} would add MACs; use values >= 1 (1: no structured pruning)"
                )
        for s in self.sparsity:
            if not 0 <= s < 1:
                raise ValueError(f"sparsity: {s} is not a share of zeros in [0, 1)")
        for b in self.bits:
            if b is not None and not 2 <= b <= 8:
                raise ValueError(f"bits: {b} is outside 2-8 (null: stay float)")
        for b in self.encode_bits:
            if b is not None and not 1 <= b <= 8:
                raise ValueError(f"encode_bits: {b} is outside 1-8 (null: no packed file)")
        return self


@dataclass(frozen=True)
class Plan:
    """One point of the space: which compression steps, in the pipeline's order."""

    macs_reduction: float = 1.0
    sparsity: float = 0.0
    bits: int | None = None
    encode_bits: int | None = None
    distill: bool = False
    quantize: QuantizeKind = "static"
    mixed_drop: float = 0.0  # quantize mixed: points quantizing alone may lose (the search's max_drop)

    @property
    def pruned(self) -> bool:
        return self.macs_reduction > 1 or self.sparsity > 0

    @property
    def trains(self) -> bool:
        """Whether the plan has something to fine-tune (pruned weights, packed centroids, or QAT)."""
        return self.pruned or self.encode_bits is not None or self.qat

    @property
    def qat(self) -> bool:
        return self.bits is not None and self.quantize == "qat"

    def untrained(self) -> Plan:
        """The plan as built at the look, before any training: distilling and fine-tuning, QAT and
        static quantization give the same model there (one look serves the twins)."""
        return replace(self, distill=False, quantize="static" if self.qat else self.quantize)

    @property
    def key(self) -> str:
        """A short stable name: ``macs2-sp0.5-kd-w8``, ``w8-qat``, ``w8-mix0.5``, ``enc5`` (``float`` for
        the model as given)."""
        parts = []
        if self.macs_reduction > 1:
            parts.append(f"macs{self.macs_reduction:g}")
        if self.sparsity:
            parts.append(f"sp{self.sparsity:g}")
        if self.distill:
            parts.append("kd")
        if self.bits is not None:
            parts.append(f"w{self.bits}")
            if self.quantize == "qat":
                parts.append("qat")
            elif self.quantize == "mixed":
                parts.append(f"mix{self.mixed_drop:g}")
        if self.encode_bits is not None:
            parts.append(f"enc{self.encode_bits}")
        return "-".join(parts) or "float"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def stages(self, epochs: int, lr: float = 3e-4) -> list[dict[str, dict[str, Any]]]:
        """The recipe stages that build this plan, fine-tuning (or distilling back) ``epochs`` epochs
        after pruning; ``epochs`` 0 builds it without recovery (the cheap first look)."""
        out: list[dict[str, dict[str, Any]]] = []
        if self.macs_reduction > 1:
            out.append({"prune": {"granularity": "structured", "macs_reduction": self.macs_reduction}})
        if self.sparsity:
            out.append({"prune": {"granularity": "unstructured", "sparsity": self.sparsity}})
        if self.pruned and epochs:
            if self.distill:
                out.append({"distill": {"student": "current", "epochs": epochs, "lr": lr}})
            elif not self.qat:  # QAT trains the pruned weights itself (they stay zero): no second fine-tune
                out.append({"finetune": {"epochs": epochs, "lr": lr}})
        if self.bits is not None:
            quantize: dict[str, Any] = {"mode": "static", "bits": self.bits, "activation_bits": self.bits}
            if self.qat and epochs:
                quantize |= {"mode": "qat", "epochs": epochs, "lr": lr}
            elif self.quantize == "mixed":
                # on the search's data the test split is the held-out share: the budget is judged there
                quantize["mixed"] = {"max_drop": self.mixed_drop, "candidates": [self.bits]}
            out.append({"quantize": quantize})
        if self.encode_bits is not None:
            out.append({"encode": {"bits": self.encode_bits, "finetune_epochs": epochs}})
        return out


def plans(space: SearchSpace, max_drop: float = 0.5) -> list[Plan]:
    """Every consistent plan of the space: a quantized (ONNX) model cannot be packed as well,
    distilling without pruning recovers nothing (that combination is the plain one), and a float plan
    has no quantization kind. ``max_drop`` is the budget of ``quantize: mixed`` plans."""
    found: dict[str, Plan] = {}
    for macs, sparsity, bits, kind, encode, distill in itertools.product(
        space.macs_reduction, space.sparsity, space.bits, space.quantize, space.encode_bits, space.distill
    ):
        if bits is not None and encode is not None:
            continue
        plan = Plan(
            macs,
            sparsity,
            bits,
            encode,
            distill and (macs > 1 or sparsity > 0),
            kind if bits is not None else "static",
            max_drop if bits is not None and kind == "mixed" else 0.0,
        )
        found.setdefault(plan.key, plan)
    if not found:
        raise ValueError(
            "space: no consistent plan, every one both quantizes (bits) and packs (encode_bits); add null "
            "to one of the two lists"
        )
    return list(found.values())
