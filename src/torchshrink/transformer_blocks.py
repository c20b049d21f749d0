"""The blocks of a transformer encoder, found by structure: attention, feed-forward, layer list.

BERT-family encoders (BERT, RoBERTa, ELECTRA, MiniLM, XLM-R, ViT, DeiT, ... as transformers builds
them) share one layout, which this module recognises without importing transformers:

* **attention**: a module with ``query``, ``key``, ``value`` linear layers and the attributes
  ``num_attention_heads`` and ``attention_head_size``; its parent's ``output.dense`` projects the
  concatenated heads back to the hidden size. A head owns ``attention_head_size`` rows of q/k/v
  and as many columns of the output projection.
* **feed-forward**: a layer's ``intermediate.dense`` (hidden -> inner) and ``output.dense``
  (inner -> hidden); a neuron owns one row of the first and one column of the second.
* **layer list**: the ``nn.ModuleList`` whose entries each hold one attention block.

Structured pruning turns heads and neurons into channel groups (the tracer cannot follow the
head split), drops whole layers, and records the new head counts and list lengths as data so the
smaller model rebuilds from its own file (:mod:`torchshrink.shapes`).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = [
    "AttentionBlock",
    "FeedForwardBlock",
    "is_attention",
    "attention_blocks",
    "feed_forward_blocks",
    "layer_lists",
    "sync_head_counts",
    "set_head_count",
]


def is_attention(module: nn.Module) -> bool:
    """A self-attention module of the BERT layout (q/k/v linears, head count and size attributes)."""
    return (
        all(isinstance(getattr(module, n, None), nn.Linear) for n in ("query", "key", "value"))
        and isinstance(getattr(module, "num_attention_heads", None), int)
        and isinstance(getattr(module, "attention_head_size", None), int)
    )


@dataclass(frozen=True)
class AttentionBlock:
    """One attention block: the self-attention module and the projection of its heads."""

    name: str
    attention: nn.Module
    output_name: str
    output: nn.Linear

    @property
    def heads(self) -> int:
        return self.attention.query.out_features // self.attention.attention_head_size

    @property
    def head_size(self) -> int:
        return int(self.attention.attention_head_size)


@dataclass(frozen=True)
class FeedForwardBlock:
    """One feed-forward block: ``up`` (hidden -> inner) and ``down`` (inner -> hidden)."""

    up_name: str
    up: nn.Linear
    down_name: str
    down: nn.Linear

    @property
    def neurons(self) -> int:
        return self.up.out_features


def _child(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def attention_blocks(model: nn.Module) -> list[AttentionBlock]:
    """Every attention block whose head projection is found and fits (``output.dense`` of its parent)."""
    modules = dict(model.named_modules())
    out = []
    for name, module in modules.items():
        if not is_attention(module) or not name:
            continue
        parent_name = name.rpartition(".")[0]
        projection = _child(modules[parent_name], "output.dense")
        q = module.query
        if (
            isinstance(projection, nn.Linear)
            and projection.in_features == q.out_features
            and q.out_features % module.attention_head_size == 0
            and module.key.out_features == module.value.out_features == q.out_features
        ):
            out.append(AttentionBlock(name, module, _join(parent_name, "output.dense"), projection))
    return out


def feed_forward_blocks(model: nn.Module) -> list[FeedForwardBlock]:
    """Every ``intermediate.dense`` -> ``output.dense`` pair of a layer that holds an attention block
    (the layer is the attention module's grandparent: ``layer.attention.self``)."""
    out = []
    for block in attention_blocks(model):
        if block.name.count(".") < 2:
            continue
        layer_name = block.name.rsplit(".", 2)[0]
        layer = model.get_submodule(layer_name)
        up, down = _child(layer, "intermediate.dense"), _child(layer, "output.dense")
        if isinstance(up, nn.Linear) and isinstance(down, nn.Linear) and down.in_features == up.out_features:
            out.append(
                FeedForwardBlock(
                    _join(layer_name, "intermediate.dense"), up, _join(layer_name, "output.dense"), down
                )
            )
    return out


def layer_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """The module lists whose every entry holds exactly one attention block (an encoder's layers)."""
    out = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            counts = [sum(is_attention(m) for m in entry.modules()) for entry in module]
            if all(c == 1 for c in counts):
                out.append((name, module))
    return out


def set_head_count(attention: nn.Module, heads: int) -> None:
    """Set the head bookkeeping of ``attention`` to ``heads`` heads of unchanged size."""
    attention.num_attention_heads = heads
    if hasattr(attention, "all_head_size"):
        attention.all_head_size = heads * attention.attention_head_size


def sync_head_counts(model: nn.Module) -> None:
    """After q/k/v lost rows, make every attention module's head count match its layers."""
    for module in model.modules():
        if is_attention(module):
            set_head_count(module, module.query.out_features // module.attention_head_size)
