"""SlowFast network (Feichtenhofer, Fan, Malik & He, "SlowFast Networks for Video Recognition",
2019), ResNet-50 style, compiled into a continual model that reads its two pathways at their own
frame rates.

    python examples/slowfast.py [--size small|full]

Inputs `[slow, fast]`: the Fast pathway reads every frame (T frames), the Slow pathway every α-th
(T/α frames); α = 4, the Fast pathway has β = 1/8 of the Slow pathway's channels. After the stem
and after res2, res3 and res4 a lateral connection (a conv with temporal kernel 5 and temporal
stride α, to 2βC channels) carries Fast features into the Slow pathway, concatenated onto its
channels. Bottlenecks have temporal kernel 1 in the Slow pathway's res2/res3 and 3 in res4/res5
and in every Fast stage. The head pools each pathway over time and space, concatenates, and
classifies. A step brings α frames: one Slow frame and α Fast frames.
"""
from __future__ import annotations

import torch
from torch import nn

from common import parse_size, randomize, run

ALPHA, BETA_INV = 4, 8
CONFIGS = {
    # full: SlowFast-R50 (4x16 style widths) at a 32-frame Fast clip
    "full": dict(frames=32, crop=224, width=64, depths=(3, 4, 6, 3), classes=400),
    "small": dict(frames=16, crop=32, width=16, depths=(1, 1, 1, 1), classes=5),
}


def conv_bn(cin, cout, kernel, stride=(1, 1, 1), relu=True):
    """Conv3d with 'same' padding, BatchNorm and optionally ReLU."""
    pad = tuple(k // 2 for k in kernel)
    layers = [nn.Conv3d(cin, cout, kernel, stride, pad, bias=False), nn.BatchNorm3d(cout)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if relu else nn.Sequential(*layers)


class Bottleneck(nn.Module):
    """1x1 (temporal kernel kt) -> 1x3x3 (spatial stride) -> 1x1, residual with a projection
    where the shape changes."""

    def __init__(self, cin, inner, cout, kt, stride):
        super().__init__()
        self.a = conv_bn(cin, inner, (kt, 1, 1))
        self.b = conv_bn(inner, inner, (1, 3, 3), (1, stride, stride))
        self.c = conv_bn(inner, cout, (1, 1, 1), relu=False)
        self.short = (conv_bn(cin, cout, (1, 1, 1), (1, stride, stride), relu=False)
                      if cin != cout or stride != 1 else nn.Identity())

    def forward(self, x):
        return torch.relu(self.c(self.b(self.a(x))) + self.short(x))


def stage(cin, inner, cout, depth, kt, stride):
    return nn.Sequential(*[Bottleneck(cin if i == 0 else cout, inner, cout, kt, stride if i == 0 else 1)
                           for i in range(depth)])


class Lateral(nn.Module):
    """Fast -> Slow: temporal kernel 5, temporal stride α, 2βC channels (time-strided conv)."""

    def __init__(self, c_fast):
        super().__init__()
        self.conv = nn.Conv3d(c_fast, 2 * c_fast, (5, 1, 1), (ALPHA, 1, 1), (2, 0, 0), bias=False)
        self.bn = nn.BatchNorm3d(2 * c_fast)

    def forward(self, fast):
        return torch.relu(self.bn(self.conv(fast)))


class SlowFast(nn.Module):
    def __init__(self, frames, crop, width, depths, classes):
        super().__init__()
        w, f = width, width // BETA_INV                     # Slow and Fast stem widths
        self.slow_stem = nn.Sequential(conv_bn(3, w, (1, 7, 7), (1, 2, 2)),
                                       nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1)))
        self.fast_stem = nn.Sequential(conv_bn(3, f, (5, 7, 7), (1, 2, 2)),
                                       nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1)))
        slow_kt, strides = (1, 1, 3, 3), (1, 2, 2, 2)
        self.slow, self.fast, self.laterals = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        cs, cf = w, f
        self.laterals.append(Lateral(cf))
        for i, depth in enumerate(depths):
            out_s, out_f = 4 * w * 2 ** i, 4 * f * 2 ** i
            self.slow.append(stage(cs + 2 * cf, w * 2 ** i, out_s, depth, slow_kt[i], strides[i]))
            self.fast.append(stage(cf, f * 2 ** i, out_f, depth, 3, strides[i]))
            cs, cf = out_s, out_f
            if i < len(depths) - 1:                         # after res2, res3 and res4
                self.laterals.append(Lateral(cf))
        self.fc = nn.Linear(cs + cf, classes)

    def forward(self, x):
        slow, fast = x
        slow, fast = self.slow_stem(slow), self.fast_stem(fast)
        for i in range(len(self.slow)):
            slow = torch.cat([slow, self.laterals[i](fast)], 1)
            slow, fast = self.slow[i](slow), self.fast[i](fast)
        pooled = torch.cat([slow.mean((2, 3, 4)), fast.mean((2, 3, 4))], 1)
        return self.fc(pooled)


def build(size: str = "small", seed: int = 0) -> SlowFast:
    """A SlowFast network in eval mode with random weights."""
    return randomize(SlowFast(**CONFIGS[size]), seed)


def example_input(size: str = "small", batch: int = 1, seed: int = 0) -> list[torch.Tensor]:
    """[slow, fast] of one random clip: the Fast pathway every frame, the Slow one every α-th."""
    cfg = CONFIGS[size]
    g = torch.Generator().manual_seed(seed)
    fast = torch.randn(batch, 3, cfg["frames"], cfg["crop"], cfg["crop"], generator=g)
    return [fast[:, :, ::ALPHA].contiguous(), fast]


def full():
    """The full-size model and its example clip, for the CLI: `cocompile examples/slowfast.py:full ...`."""
    return build("full"), example_input("full")


def main(argv=None) -> dict:
    """Compile SlowFast, verify E1 and report."""
    size = parse_size(argv, __doc__)
    model, clip = build(size), example_input(size)
    return {"exact": run(f"SlowFast-R50 style ({size})", model, clip)}


if __name__ == "__main__":
    main()
