"""Clip reductions of every kind stream exactly (E1 and, unpadded, E2); the same ops over other
axes stay per-frame."""
import torch
from torch import nn

import cocompile


class Heads(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, (3, 1))           # time on axis 2, unpadded

    def forward(self, x):
        y = torch.tanh(self.conv(x))                   # (N, 4, T', W)
        return (y.mean(2), y.sum((2, 3)), y.amax(2), y.var(2), y.std((1, 2)),
                y.max(2).values, y.argmax(2), y.amin(2), y[:, :, -1], y[:, :, 0],
                y.mean(3), y.amax(1, keepdim=True))    # the last two: per-frame


def test_every_reduction_over_time_is_exact_and_others_stay_per_frame():
    torch.manual_seed(0)
    model = Heads().eval()
    clip = torch.randn(2, 3, 12, 5)
    co = cocompile.compile(model, clip[:1])
    kinds = [i.kind for i in co.out_infos]
    assert kinds == ["clip"] * 10 + ["time"] * 2
    report = cocompile.verify(model, co, clip)
    assert report.passed and co.exact_sliding, report
    assert sum(c.name == "E2" for c in report.checks) == 10


class PooledHeads(nn.Module):
    """Heads that reduce time and other axes together (ST-GCN's avg_pool2d over (T, V))."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, (3, 1))

    def forward(self, x):
        y = torch.tanh(self.conv(x))                    # (N, 4, T', V)
        return (nn.functional.avg_pool2d(y, y.shape[2:]), nn.functional.max_pool2d(y, y.shape[2:]),
                y.mean((2, 3)), y.sum((1, 2)), y.amax((2, 3), keepdim=True))


def test_reductions_over_time_and_other_axes_buffer_one_value_per_frame():
    torch.manual_seed(0)
    model = PooledHeads().eval()
    clip = torch.randn(2, 3, 12, 5)
    co = cocompile.compile(model, clip[:1])
    report = cocompile.verify(model, co, clip)
    assert report.passed and sum(c.name == "E2" and c.claimed for c in report.checks) == 5, report
    # each window keeps the 10 frames reduced over the other axes: (4, 10, 1) or (1, 10, 5)
    windows = sorted(s.shape for s in co.specs if s.name.endswith("clip") or ".clip" in s.name)
    assert windows == [(1, 10, 5)] + [(4, 10, 1)] * 4, windows
