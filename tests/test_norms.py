"""Normalisations: per frame they stay exact; over time they are refused, or with approximate=True
use the statistics of the last L frames, reported approximate with the measured deviation. The
offline module is the oracle: at the flush (whole-clip statistics), on every prefix of the clip,
and on the last L frames of a long stream."""
import math

import pytest
import torch
from torch import nn

import cocompile
from cocompile.verify import RTOL

C, T = 6, 30


def _randomised(module: nn.Module) -> nn.Module:
    """Random affine parameters (not the identity of a fresh norm), eval mode."""
    for p in module.parameters():
        p.data = torch.randn_like(p)
    return module.eval()


class GlobalLayerNorm(nn.Module):
    """Conv-TasNet's gLN written by hand: statistics over (channels, time)."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(channels, 1)), nn.Parameter(torch.zeros(channels, 1))
        self.eps = eps

    def forward(self, x):
        mean = x.mean((1, 2), keepdim=True)
        var = ((x - mean) ** 2).mean((1, 2), keepdim=True)
        return self.weight * (x - mean) / torch.sqrt(var + self.eps) + self.bias


OVER_TIME = {
    "GroupNorm(2, C)": lambda: nn.GroupNorm(2, C),
    "GroupNorm(C, C)": lambda: nn.GroupNorm(C, C),          # after a strided conv, as in wav2vec 2.0
    "InstanceNorm1d": lambda: nn.InstanceNorm1d(C),
    "InstanceNorm1d(affine)": lambda: nn.InstanceNorm1d(C, affine=True),
    "LayerNorm([C, T])": lambda: nn.LayerNorm([C, T]),
    "RMSNorm([C, T])": lambda: nn.RMSNorm([C, T]),
    "gLN by hand": lambda: GlobalLayerNorm(C),
}
STRIDED = ("GroupNorm(C, C)",)


class Branches(nn.Module):
    """Norms over time, each on a padded conv's output (its frames trail the input by one) or on a
    strided conv's (wav2vec 2.0's first layer: kernel 10, stride 5)."""

    def __init__(self, names):
        super().__init__()
        self.names = list(names)
        self.conv, self.strided = nn.Conv1d(C, C, 3, padding=1), nn.Conv1d(C, C, 10, stride=5)
        self.norm = nn.ModuleList([_randomised(OVER_TIME[n]()) for n in self.names])

    def forward(self, x):
        y = torch.relu(self.conv(x))
        z = self.strided(x) if set(self.names) & set(STRIDED) else None
        return tuple(norm(z if name in STRIDED else y) for name, norm in zip(self.names, self.norm))


def _close(got: torch.Tensor, ref: torch.Tensor) -> bool:
    return float((got - ref).abs().max()) <= RTOL * max(1.0, float(ref.abs().max()))


@pytest.mark.parametrize("name", OVER_TIME)
def test_norm_over_time_is_refused_naming_the_module(name):
    model = Branches([name]).eval()
    with pytest.raises(cocompile.CompileError, match="over axes that include time|broadcast back") as err:
        cocompile.compile(model, torch.randn(1, C, T))
    assert err.value.module.startswith("norm.0 ("), err.value
    assert "approximate=True" in err.value.hint, err.value


@torch.no_grad()
def test_norms_over_time_are_approximate_with_the_clip_statistics_at_the_flush():
    """approximate=True: E1 measured and reported, not claimed, per output. The frames normalised
    at the flush use the whole clip's statistics, so they equal the offline ones (not the
    hand-written gLN's: its variance averages each frame's deviation from the mean known at its
    own step, so that path stays approximate to the end)."""
    torch.manual_seed(0)
    model, clip = Branches(OVER_TIME).eval(), torch.randn(2, C, T)
    co = cocompile.compile(model, clip, approximate=True)
    report = cocompile.verify(model, co, clip)
    e1 = [c for c in report.checks if c.name == "E1"]
    assert report.approximate and len(e1) == len(OVER_TIME) and not any(c.claimed for c in e1), report
    assert math.isfinite(co.deviation) and f"E1 deviation {report.max_error('E1'):.3g}" in str(report)
    assert {o["exactness"] for o in co.metadata()["outputs"]} == {"approximate"}
    got, ref = co.forward_steps(clip), model(clip)
    for name, info, check, g, r in zip(OVER_TIME, co.out_infos, e1, got, ref):
        assert info.approx and math.isfinite(check.error) and check.error > check.bound, name
        if name != "gLN by hand":
            assert info.warmup >= 1 and _close(g[..., -1], r[..., -1]), name   # emitted by the flush


class Norms(nn.Module):
    """Three norms over time on the input itself (the oracle runs each on a prefix or a window)."""

    def __init__(self, length: int):
        super().__init__()
        self.norms = nn.ModuleList([_randomised(nn.GroupNorm(3, C)),
                                    _randomised(nn.InstanceNorm1d(C, affine=True)),
                                    _randomised(nn.LayerNorm([C, length]))])

    def forward(self, x):
        return tuple(norm(x) for norm in self.norms)


def _on_frames(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`norm` on the frames x; a LayerNorm([C, L]) on fewer frames with its leading parameter
    positions (as the first frames of a clip have)."""
    if isinstance(norm, nn.LayerNorm):
        n = x.shape[-1]
        return nn.functional.layer_norm(x, [C, n], norm.weight[:, :n], norm.bias[:, :n], norm.eps)
    return norm(x)


@pytest.fixture(scope="module")
def norms():
    torch.manual_seed(2)
    model = Norms(24).eval()
    with torch.no_grad():
        return model, cocompile.compile(model, torch.randn(1, C, 24), step_frames=8, approximate=True)


@torch.no_grad()
def test_each_step_normalises_with_the_clip_so_far(norms):
    """From a fresh state the frames of the step ending at frame e equal the norm on frames
    [0, e]: the zero state is left out of the statistics, and nothing else is approximate."""
    model, co = norms
    clip, state = torch.randn(2, C, co.clip_length) * 2 + 3, co.initial_state(2)
    for k, chunk in enumerate(clip.split(8, 2)):
        outs, state = co.step(chunk, state)
        for norm, out in zip(model.norms, outs):
            assert _close(out, _on_frames(norm, clip[..., :8 * (k + 1)])[..., -8:]), (k, norm)


@torch.no_grad()
def test_a_long_stream_does_not_drift(norms):
    """E3: along 10^4 frames of a stationary input, late steps equal the norms recomputed on the
    last L frames (statistics are re-formed from the window each step, never accumulated)."""
    model, co = norms
    stream, L = torch.randn(1, C, 10_000) * 2 + 3, co.clip_length
    state = co.initial_state(1)
    for k, chunk in enumerate(stream.split(8, 2)):
        outs, state = co.step(chunk, state)
        end = (k + 1) * 8
        if end == L or end > stream.shape[2] - 32:          # the window just full, and late
            for out, ref in zip(outs, model(stream[..., end - L:end])):
                assert _close(out, ref[..., -8:]), end


class FrameLocal(nn.Module):
    """Norms over channels or features only, and per-frame statistics (running statistics, or
    time folded into the batch)."""

    def __init__(self):
        super().__init__()
        self.ln = _randomised(nn.LayerNorm(5))
        self.rms = _randomised(nn.RMSNorm([5]))
        self.gn = _randomised(nn.GroupNorm(2, C))
        self.inst = _randomised(nn.InstanceNorm2d(C, affine=True, track_running_stats=True))
        self.inst.running_mean.uniform_(-1, 1), self.inst.running_var.uniform_(0.5, 2)

    def forward(self, x):                                      # (N, C, T, 5)
        y = self.rms(self.ln(x))
        n, c, t, f = y.shape
        y = self.gn(y.transpose(1, 2).reshape(n * t, c, f))    # time in the batch
        return self.inst(y.reshape(n, t, c, f).transpose(1, 2))


def test_norms_within_a_frame_stay_exact():
    torch.manual_seed(4)
    model, clip = FrameLocal().eval(), torch.randn(2, C, T, 5)
    co = cocompile.compile(model, clip, verify=False)
    report = cocompile.verify(model, co, clip)
    assert report.passed and not co.approximate and not co.specs[1:], report


class Decomposed(nn.Module):
    """A GLU first: it has no rule of its own, so compile() decomposes the model into core ATen."""

    def __init__(self):
        super().__init__()
        self.gn = _randomised(nn.GroupNorm(2, C))
        self.inst = _randomised(nn.InstanceNorm1d(C, affine=True))

    def forward(self, x):
        x = nn.functional.glu(x, 1)
        return self.gn(x), self.inst(x)


@torch.no_grad()
def test_decomposed_norms_follow_the_same_rules():
    """The core-ATen forms: native_group_norm, and an instance norm as a batch norm with batch
    statistics over (1, N*C, T)."""
    torch.manual_seed(5)
    model, clip = Decomposed().eval(), torch.randn(2, 2 * C, T)
    co = cocompile.compile(model, clip, approximate=True)
    ops = {str(n.target) for n in co.program.gm.graph.nodes}
    assert {"aten.native_group_norm.default", "aten._native_batch_norm_legit.no_stats"} <= ops
    assert co.approximate and math.isfinite(co.deviation) and co.deviation > RTOL
    for got, ref in zip(co.forward_steps(clip), model(clip)):
        assert _close(got[..., -1], ref[..., -1])              # the last step's: the whole clip


def test_batch_statistics_over_streams_are_refused():
    model = nn.Sequential(nn.Conv1d(C, C, 3), nn.BatchNorm1d(C, track_running_stats=False)).eval()
    with pytest.raises(cocompile.CompileError, match="over the batch axis"):
        cocompile.compile(model, torch.randn(2, C, T), approximate=True)
