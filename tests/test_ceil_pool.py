"""Pooling with ceil_mode along time: steps emit whole windows, the flush the partial last one.

Oracle: the untouched offline model. E1 for max and average pooling (count_include_pad both ways)
over kernels, strides, paddings and clip lengths that leave a partial last window, with time on
each spatial axis of 1D/2D/3D layouts; a partial window is end padding, so E2 is not claimed then.
"""
import os

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import cocompile

AVG = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
MAX = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}


def per_axis(nd: int, t: int, along_time, other) -> tuple:
    return tuple(along_time if i == t else other for i in range(nd))


class CeilPool(nn.Module):
    """`trim` frames cut off the start along time (so the pool sees lengths that are not a multiple
    of its stride), then a ceil_mode pool along time (and a 2-wide one on the other axes)."""

    def __init__(self, nd: int, t: int, pool: nn.Module, trim: int):
        super().__init__()
        self.nd, self.t, self.trim, self.pool = nd, t, trim, pool

    def forward(self, x):
        x = torch.relu(x) - 0.5           # ties and a sign change, so max and mean both matter
        cut = [slice(None)] * x.dim()
        cut[2 + self.t] = slice(self.trim, None)
        return self.pool(x[tuple(cut)])


def _pool(nd, t, avg, k, s, p, d, include):
    if avg:
        return AVG[nd](per_axis(nd, t, k, 2), per_axis(nd, t, s, 2), per_axis(nd, t, p, 1), ceil_mode=True,
                       count_include_pad=include)
    return MAX[nd](per_axis(nd, t, k, 2), per_axis(nd, t, s, 2), per_axis(nd, t, p, 1),
                   per_axis(nd, t, d, 1), ceil_mode=True)


@st.composite
def ceil_pools(draw):
    """(model, clip, time_dim, partial): a ceil_mode pool whose clip may leave a partial window."""
    nd, avg = draw(st.integers(1, 3)), draw(st.booleans())
    t = draw(st.integers(0, nd - 1))
    k, s = draw(st.integers(2, 4)), draw(st.integers(2, 3))
    d = 1 if avg else draw(st.sampled_from([1, 2]))
    p = draw(st.integers(0, k // 2))
    length, trim = s * draw(st.integers(3, 5)), draw(st.integers(0, s - 1))
    n, e = length - trim, d * (k - 1) + 1
    assume(n + 2 * p >= e)
    pool = _pool(nd, t, avg, k, s, p, d, draw(st.booleans()))
    shape = [2, 2] + [3] * nd
    shape[2 + t] = length
    whole = (n + 2 * p - e) // s + 1
    partial = (n + 2 * p - e) % s != 0 and whole * s < n + p   # (the last window starts in the clip)
    return CeilPool(nd, t, pool, trim).eval(), torch.randn(shape), 2 + t, partial


@settings(max_examples=int(os.environ.get("COCOMPILE_CEIL_POOL_EXAMPLES", "25")), deadline=None,
          derandomize=bool(os.environ.get("CI")), suppress_health_check=list(HealthCheck), print_blob=True)
@given(ceil_pools())
def test_ceil_mode_pools_stream_exactly(case):
    model, clip, time_dim, partial = case
    co = cocompile.compile(model, clip[:1], time_dim=time_dim, trace=False, verify=False)
    with torch.no_grad():
        ref, got = model(clip), co.forward_steps(clip)
    assert got.shape == ref.shape
    assert float((got - ref).abs().max()) <= 1e-4 * max(1.0, float(ref.abs().max()))
    if partial:                   # the last window reaches past the clip: end padding (no E2)
        assert not co.exact_sliding


def test_partial_windows_divide_as_torch_does():
    """Average pooling of a clip that leaves a partial window at each end: with count_include_pad
    the divisor counts the padding but not what lies past it, without it only real frames; the
    traced step agrees with the model, and E2 is claimed only where no window is partial."""
    torch.manual_seed(0)
    clip = torch.rand(2, 3, 12) + 1.0                 # positive: a wrong divisor changes every value
    for include in (True, False):
        for k, s, p, partial in ((3, 2, 1, True), (4, 3, 1, True), (3, 3, 0, False)):
            model = nn.AvgPool1d(k, s, p, ceil_mode=True, count_include_pad=include).eval()
            co = cocompile.compile(model, clip[:1])    # verifies E1 with the traced step
            torch.testing.assert_close(co.forward_steps(clip), model(clip), rtol=0, atol=1e-5)
            assert co.exact_sliding == (not partial and p == 0)

