"""int8 embedding tables: a transformer's word-embedding table is most of its file (all-MiniLM-L6-v2:
30,522 x 384 floats, 47 MB of 90 MB), and a lookup needs no int8 kernel to shrink it.

:func:`snap_embedding_tables` puts each large ``nn.Embedding`` table on a block-wise symmetric int8
grid (one scale per ``block`` consecutive values of a row, codes -127..127), in place: the fake-quant
model then computes exactly what the int8 file will. The ONNX side
(:func:`torchshrink.onnx_passes.pack_embedding_tables`) recognises a table on such a grid and stores
it as int8 codes read by ONNX Runtime's ``GatherBlockQuantized``, which dequantizes only the rows it
looks up. Snapping is idempotent, so a saved model (whose weights are on the grid) reloads unchanged.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from torchshrink.onnx_passes import MIN_TABLE_ELEMENTS, TABLE_BLOCKS, block_int8

log = logging.getLogger(__name__)

__all__ = ["table_block", "embedding_tables", "snap_embedding_tables"]


def table_block(width: int) -> int | None:
    """The largest supported block size that divides a row of ``width`` values (None: none does)."""
    return next((b for b in TABLE_BLOCKS if width % b == 0), None)


def embedding_tables(model: nn.Module) -> dict[str, int]:
    """The ``nn.Embedding`` tables worth storing as int8 (at least ``MIN_TABLE_ELEMENTS`` values, a row
    width some block size divides), with their block size."""
    tables = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Embedding) or module.weight.numel() < MIN_TABLE_ELEMENTS:
            continue
        block = table_block(module.embedding_dim)
        if block is None:
            log.info("embedding %r stays float: no block size in %s divides its width", name, TABLE_BLOCKS)
            continue
        tables[name] = block
    return tables


def snap_embedding_tables(model: nn.Module) -> list[str]:
    """Snap every table of :func:`embedding_tables` to its int8 block grid, in place; returns their names."""
    snapped = []
    for name, block in embedding_tables(model).items():
        module = model.get_submodule(name)
        codes, scale = block_int8(module.weight.detach().float().cpu().numpy(), block)
        values = codes.reshape(*scale.shape, block) * scale[..., None]
        with torch.no_grad():
            module.weight.copy_(torch.from_numpy(values.reshape(module.weight.shape)))
        snapped.append(name)
    if snapped:
        log.info("embedding table(s) %s on an int8 grid (int8 in the ONNX file)", snapped)
    return snapped
