"""Cutting a model's fx graph into pipeline stages that run its own modules: the chained stages
compute what the model computes, values used across several cuts are passed on, and models that
cannot be cut so are left to torch.export (None)."""

from __future__ import annotations

import torch
from torch import nn

from torchshrink.parallel.graph_split import graph_stages
from torchshrink.parallel.pipelining import blocks
from torchshrink.zoo import build


def _chain(stages, x):
    values = (x,)
    for part in stages:
        out = part.module(*values)
        values = out if isinstance(out, tuple) else (out,)
    return out


def test_stages_share_the_models_parameters_and_compute_its_output():
    torch.manual_seed(0)
    model = build("resnet", width=8).eval()
    x = torch.rand(6, 1, 28, 28)
    stages = graph_stages(model, x, ["layers.2"])
    assert stages is not None and len(stages) == 2
    ids = [{id(p) for p in part.module.parameters()} for part in stages]
    assert not ids[0] & ids[1] and ids[0] | ids[1] == {id(p) for p in model.parameters()}
    assert torch.allclose(_chain(stages, x), model(x), atol=1e-6)
    # the example's inputs and outputs of each stage (what PipelineStage is given instead of
    # running the module on empty tensors): activations carry gradients, the model's input does not
    assert not stages[0].inputs[0].requires_grad and stages[1].inputs[0].requires_grad
    assert stages[1].inputs[0].shape == stages[0].outputs.shape


class _Late(nn.Module):
    """Reads its input again after two cuts: the stages in between pass it on."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.b(self.a(x))) + x


def test_a_value_read_after_several_cuts_is_passed_on():
    torch.manual_seed(0)
    model, x = _Late(), torch.rand(3, 4)
    stages = graph_stages(model, x, ["b", "c"])
    assert stages is not None and len(stages) == 3
    assert isinstance(stages[1].outputs, tuple) and len(stages[1].outputs) == 2  # c's input and x
    assert torch.allclose(_chain(stages, x), model(x))


def test_a_cut_inside_a_residual_block_sends_the_skip_connection_along():
    torch.manual_seed(0)
    model, x = build("resnet", width=8).eval(), torch.rand(2, 1, 28, 28)
    stages = graph_stages(model, x, ["layers.1.conv2"])
    assert stages is not None and isinstance(stages[0].outputs, tuple) and len(stages[0].outputs) == 2
    assert torch.allclose(_chain(stages, x), model(x), atol=1e-6)


class _Reused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(self.b(self.a(x)))


def test_models_that_cannot_be_cut_by_their_graph_are_left_to_torch_export():
    x = torch.rand(3, 4)
    assert graph_stages(_Reused(), x, ["b"]) is None  # a's weights would run in both stages
    assert graph_stages(_Late(), x, ["c", "b"]) is None  # boundaries out of order
    assert graph_stages(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), x, ["5"]) is None  # never reached


def test_a_fake_quant_graph_module_is_cut_at_its_blocks_in_call_order():
    from torchshrink.quantization.ptq import quantize_model, uniform_plan

    torch.manual_seed(0)
    model, x = build("lenet300", in_features=64), torch.rand(32, 64)
    qat = quantize_model(model, x, uniform_plan(model, "static", 8), [x])
    order = blocks(qat)
    assert order.index("0") < order.index("2") < order.index("4")  # quantizers interleaved, in call order
    stages = graph_stages(qat, x, ["2"])
    assert stages is not None and torch.allclose(_chain(stages, x), qat(x), atol=1e-6)


class _Tied(nn.Module):
    """An output layer sharing the input layer's weight matrix (tied embeddings, in small)."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.mid, self.last = (
            nn.Linear(4, 4, bias=False),
            nn.Linear(4, 4),
            nn.Linear(4, 4, bias=False),
        )
        self.last.weight = self.first.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.mid(self.first(x)))


def test_tied_weights_across_a_cut_are_not_split_into_two_copies():
    x = torch.rand(3, 4)
    assert graph_stages(_Tied(), x, ["mid"]) is None  # first and last (one weight) on both sides
