"""Never silently wrong: where the example clip leaves a value's time axis in doubt, a second
capture settles it (passes/shape_probe.py) or compile refuses; and compile checks E1 on the example
clip before it returns a model."""
import pytest
import torch
from torch import nn

import cocompile
from cocompile.passes.shape_probe import ShapeProbe


class Block(nn.Module):
    """A 3D ResNet block with a temporal stride of 2 (and a strided 1x1x1 shortcut)."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, 3, stride=(2, 2, 2), padding=1)
        self.bn = nn.BatchNorm3d(cout)
        self.short = nn.Conv3d(cin, cout, 1, stride=(2, 2, 2))

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)) + self.short(x))


class ResNet3d(nn.Module):
    """Three temporal strides of 2: an 8-frame clip leaves a single frame before the head."""

    HEADS = {"view": lambda p: p.view(p.size(0), -1), "flatten": lambda p: p.flatten(1),
             "squeeze3": lambda p: p.squeeze(-1).squeeze(-1).squeeze(-1),
             "reshape": lambda p: p.reshape(-1, 16)}

    def __init__(self, head):
        super().__init__()
        self.stem = nn.Conv3d(3, 8, 3, padding=1)
        self.layers = nn.Sequential(Block(8, 8), Block(8, 16), Block(16, 16))
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(16, 10)
        self.head = head

    def forward(self, x):
        return self.fc(self.HEADS[self.head](self.pool(self.layers(self.stem(x)))))


@pytest.mark.parametrize("head", sorted(ResNet3d.HEADS))
def test_three_temporal_strides_on_eight_frames_are_exact(head):
    torch.manual_seed(0)
    model = ResNet3d(head).eval()
    clip = torch.randn(1, 3, 8, 16, 16)
    co = cocompile.compile(model, clip, time_dim=2)
    assert co.out_infos[0].kind == "clip" and co.step_frames == 8
    report = cocompile.verify(model, co, torch.randn(2, 3, 8, 16, 16))
    assert report.passed, str(report)
    assert report.max_error("E1") < 1e-4


def test_an_output_that_drops_the_batch_of_one_stream_is_refused_with_the_shapes():
    class Squeezed(ResNet3d):
        def forward(self, x):              # .squeeze() also drops the batch axis of one stream
            return self.fc(self.pool(self.layers(self.stem(x))).squeeze())

    torch.manual_seed(0)
    with pytest.raises(cocompile.CompileError, match=r"E1.*shape \(1, 10\).*\(10,\)"):
        cocompile.compile(Squeezed("view").eval(), torch.randn(1, 3, 8, 16, 16))


def test_a_doubt_the_second_capture_cannot_settle_is_refused():
    class FixedLength(ResNet3d):
        def forward(self, x):              # the view names 8 frames: the model takes no other length
            return super().forward(x.view(x.size(0), 3, 8, 16, 16))

    with pytest.raises(cocompile.CompileError, match="capturing the model at 16 frames") as err:
        cocompile.compile(FixedLength("view").eval(), torch.randn(1, 3, 8, 16, 16))
    assert "longer example clip" in str(err.value)


# -- compile checks E1 before it returns ---------------------------------------------------------
@torch.library.custom_op("cocompile_test::running_sum", mutates_args=())
def running_sum(x: torch.Tensor) -> torch.Tensor:
    """A cumulative sum over time (axis 2): it reads every earlier frame."""
    return x.cumsum(2)


@running_sum.register_fake
def _(x):
    return torch.empty_like(x)


@cocompile.register_op(torch.ops.cocompile_test.running_sum.default)
class WrongRule(cocompile.OpRule):
    """Claims the op is frame-local: a step would sum only its own chunk's frames."""

    def time(self, node, an):
        return an.info(node.args[0])


class RunningSum(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3, padding=1)

    def forward(self, x):
        return running_sum(self.conv(x))


def test_compile_refuses_a_model_that_does_not_meet_e1_with_the_measured_error():
    model, clip = RunningSum().eval(), torch.randn(1, 2, 12)
    with pytest.raises(cocompile.CompileError, match=r"\(E1\): output 0 differs by [0-9.e+-]+ \(allowed") as err:
        cocompile.compile(model, clip, time_dim=2)
    assert "verify=False" in str(err.value)
    co = cocompile.compile(model, clip, time_dim=2, verify=False)     # opted out: returned as is
    assert not cocompile.verify(model, co, clip).passed


def test_an_approximate_model_keeps_its_measured_deviation():
    class Gate(nn.Module):                 # squeeze-excitation over time: approximate only
        def forward(self, x):
            return x * torch.sigmoid(x.mean(2, keepdim=True))

    clip = torch.randn(1, 4, 16)
    co = cocompile.compile(Gate().eval(), clip, time_dim=2, approximate=True)
    assert co.approximate and co.deviation > 1e-3
    assert co.deviation == pytest.approx(cocompile.verify(Gate(), co, clip, 0).max_error("E1")
                                         / max(1.0, float(Gate()(clip).abs().max())), rel=1e-6)


def test_the_probe_names_the_axes_that_grow():
    def graph(T):
        ep = torch.export.export(nn.Conv1d(2, 3, 3).eval(), (torch.randn(2, 2, T),))
        return ep.graph_module
    first, second = graph(8), graph(16)
    probe = ShapeProbe.between(first, second, (8, 16))
    conv = next(n for n in first.graph.nodes if n.op == "call_function")
    assert probe.grown(conv) == {2}
