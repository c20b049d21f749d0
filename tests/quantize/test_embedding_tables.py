"""int8 embedding tables: snapping puts a table on its block grid once and for all, the ONNX pass
stores exactly such tables as int8 codes for GatherBlockQuantized (and leaves others float), and
ONNX Runtime's lookups equal the snapped table's rows."""

from __future__ import annotations

import numpy as np
import onnx
import torch
from torch import nn

from torchshrink.inputs import InputSpec
from torchshrink.onnx_export import OnnxRuntimeModel, export_onnx
from torchshrink.onnx_passes import pack_embedding_tables
from torchshrink.quantization.embeddings import snap_embedding_tables


class Lookup(nn.Module):
    def __init__(self, rows: int = 1024, width: int = 96) -> None:
        super().__init__()
        self.table = nn.Embedding(rows, width)
        self.small = nn.Embedding(16, width)  # below the size that pays: stays float

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table(ids) + self.small(ids % 16)


SPEC = InputSpec.from_dict([{"name": "ids", "dtype": "int64", "shape": [7], "low": 0, "high": 1024}])


def _ids() -> torch.Tensor:
    return torch.randint(0, 1024, (4, 7), generator=torch.Generator().manual_seed(0))


def test_snapping_puts_large_tables_on_a_block_grid_once() -> None:
    torch.manual_seed(0)
    model = Lookup()
    small = model.small.weight.detach().clone()
    assert snap_embedding_tables(model) == ["table"]
    once = model.table.weight.detach().clone()
    blocks = once.reshape(1024, 3, 32)  # 96 = 3 blocks of 32
    steps = blocks.abs().amax(-1, keepdim=True) / 127
    assert torch.allclose(blocks / steps, torch.round(blocks / steps), atol=1e-3)
    snap_embedding_tables(model)
    assert torch.equal(model.table.weight, once) and torch.equal(model.small.weight, small)


def test_the_onnx_pass_stores_a_snapped_table_as_int8_and_runs_the_same(tmp_path) -> None:
    torch.manual_seed(0)
    model = Lookup().eval()
    path = tmp_path / "float.onnx"
    export_onnx(model, path, SPEC)
    assert pack_embedding_tables(onnx.load(path)) == 0  # off the grid: left alone
    snap_embedding_tables(model)
    export_onnx(model, tmp_path / "int8.onnx", SPEC, int8=True)
    graph = onnx.load(tmp_path / "int8.onnx").graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("GatherBlockQuantized") == 1 and ops.count("Gather") >= 1  # the small table
    stored = {i.name: i.data_type for i in graph.initializer}
    assert onnx.TensorProto.UINT8 in stored.values()
    assert (tmp_path / "int8.onnx").stat().st_size < 0.4 * path.stat().st_size
    ids = _ids()
    with torch.no_grad():
        expected = model(ids)
    got = OnnxRuntimeModel(tmp_path / "int8.onnx")(ids)
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)
