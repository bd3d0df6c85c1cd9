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
