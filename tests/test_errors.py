"""Bad input gets a CompileError that names the problem, where it is, and the fix."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cocompile
from cocompile import CompileError


def conv_model(**kw):
    return nn.Sequential(nn.Conv1d(2, 4, 3, **kw), nn.ReLU()).eval()


class SortsTime(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 2, 1)

    def forward(self, x):
        return self.conv(x).sort(dim=2).values


def test_unsupported_op_names_op_module_and_source_line():
    with pytest.raises(CompileError) as err:
        cocompile.compile(SortsTime().eval(), torch.randn(1, 2, 8))
    msg = str(err.value)
    assert "aten.sort" in msg
    assert "test_errors.py" in msg and "sort(dim=2)" in msg       # the user's source line
    assert "register_op" in msg                                   # the fix


def test_training_mode_batchnorm_compiles_in_eval_with_a_warning():
    model = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.BatchNorm1d(4))
    model[1].running_mean.uniform_(-1, 1)
    model.train()
    clip = torch.randn(2, 2, 8)
    with pytest.warns(UserWarning, match="training mode"):
        co = cocompile.compile(model, clip)
    assert model.training, "the user's model keeps its mode"
    torch.testing.assert_close(co.forward_steps(clip), model.eval()(clip))


@pytest.mark.parametrize("time_dim", [0, 3, -4])
def test_time_dim_out_of_range_or_batch(time_dim):
    with pytest.raises(CompileError, match="time_dim") as err:
        cocompile.compile(conv_model(), torch.randn(1, 2, 8), time_dim=time_dim)
    assert err.value.hint


def test_time_dim_on_channels_is_refused_with_the_module():
    with pytest.raises(CompileError, match="channels") as err:
        cocompile.compile(conv_model(), torch.randn(1, 2, 8), time_dim=1)
    assert "0 (Conv1d)" in str(err.value)


def test_clip_shorter_than_receptive_field():
    with pytest.raises(CompileError, match="receptive field") as err:
        cocompile.compile(nn.Conv1d(2, 2, 5).eval(), torch.randn(1, 2, 3))
    assert "frames" in err.value.hint


def test_clip_length_not_a_multiple_of_step_frames():
    with pytest.raises(CompileError, match="not a multiple of step_frames") as err:
        cocompile.compile(conv_model(stride=2), torch.randn(1, 2, 9))
    assert "step_frames" in err.value.hint
    with pytest.raises(CompileError, match="lcm"):
        cocompile.compile(conv_model(stride=2), torch.randn(1, 2, 8), step_frames=3)


def test_integer_input_is_refused():
    with pytest.raises(CompileError, match="dtype") as err:
        cocompile.compile(conv_model(), torch.ones(1, 2, 8, dtype=torch.int64))
    assert "float" in err.value.hint


class TimeMixingLinear(nn.Module):
    def __init__(self, T=8):
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 1)
        self.fc = nn.Linear(3 * T, 5)

    def forward(self, x):
        return self.fc(self.conv(x).flatten(1))


def test_linear_over_flattened_time_is_refused():
    with pytest.raises(CompileError, match="mixes frames") as err:
        cocompile.compile(TimeMixingLinear().eval(), torch.randn(1, 2, 8))
    assert "fc (Linear)" in str(err.value)
    assert "reduce over time" in err.value.hint


class SqueezeExcite(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3, padding=1)
        self.gate = nn.Linear(4, 4)

    def forward(self, x):
        y = self.conv(x)
        return y * torch.sigmoid(self.gate(y.mean(2)))[:, :, None]


def test_clip_gating_needs_approximate_and_is_reported():
    clip = torch.randn(2, 2, 16)
    with pytest.raises(CompileError, match="approximate=True") as err:
        cocompile.compile(SqueezeExcite().eval(), clip[:1])
    assert "broadcast back onto its frames" in str(err.value)
    model = SqueezeExcite().eval()
    co = cocompile.compile(model, clip[:1], approximate=True)
    report = cocompile.verify(model, co, clip)
    assert co.approximate and report.approximate
    assert report.passed and not any(c.claimed for c in report.checks)
    assert 0 < report.max_error("E1") < float("inf")


class TwoRates(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv1d(2, 2, 2, stride=2)     # 16 frames -> 8, one per 2 input frames
        self.b = nn.Conv1d(2, 2, 9)               # 16 frames -> 8, one per input frame

    def forward(self, x):
        return self.a(x) + self.b(x)


def test_join_of_different_rates_is_an_error():
    with pytest.raises(CompileError, match="different frame rates"):
        cocompile.compile(TwoRates().eval(), torch.randn(1, 2, 16))


class PositionTable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 2, 1)
        self.pos = nn.Parameter(torch.randn(1, 2, 8))

    def forward(self, x):
        return self.conv(x) + self.pos


def test_time_position_constant_makes_the_output_a_window():
    # one entry per clip position: each step re-forms the whole window (exact, not streamed)
    model = PositionTable().eval()
    co = cocompile.compile(model, torch.randn(1, 2, 8))
    assert co.out_infos[0].kind == "window"
    report = cocompile.verify(model, co, torch.randn(2, 2, 8), sliding_steps=12)
    assert report.passed and {c.name for c in report.checks} == {"E1", "E2"}, report


class Reversed(nn.Module):
    def forward(self, x):
        return x.flip(2)


class Reflect(nn.Module):
    def forward(self, x):
        return F.pad(x, (1, 1), mode="reflect")


@pytest.mark.parametrize("model", [Reversed(), Reflect()])
def test_non_causal_time_ops_are_refused(model):
    with pytest.raises(CompileError):
        cocompile.compile(model.eval(), torch.randn(1, 2, 8))


def test_wrong_chunks_get_clear_errors():
    co = cocompile.compile(conv_model(padding=1), torch.randn(1, 2, 8))
    state = co.initial_state(1)
    with pytest.raises(CompileError, match="does not fit"):
        co.step(torch.randn(1, 3, 1), state)
    with pytest.raises(CompileError, match="dtype"):
        co.step(torch.randn(1, 2, 1, dtype=torch.float64), state)
