"""R(2+1)D (Tran et al., "A Closer Look at Spatiotemporal Convolutions for Action Recognition",
CVPR 2018), compiled into a continual model.

    python examples/r2plus1d.py [--size small|full]

"full" is R(2+1)D-18 on 16x112x112 clips: every 3x3x3 conv is factorised into a 1x3x3 spatial conv
to M channels, BN + ReLU, and a 3x1x1 temporal conv, with M chosen so the pair has the parameters
of the 3D conv. conv3_1, conv4_1 and conv5_1 stride 2 in time and space, so one step takes 8 frames.
"""
from __future__ import annotations

import torch
from torch import nn

from common import parse_size, randomize, run, video_clip

TIME_DIM = 2
VARIANTS = (("r2plus1d", {}, False),)

CONFIGS = {
    "full": dict(frames=16, crop=112, stem=64, widths=(64, 128, 256, 512), depths=(2, 2, 2, 2),
                 classes=400),
    "small": dict(frames=16, crop=32, stem=8, widths=(8, 16, 24, 32), depths=(1, 1, 1, 1),
                  classes=10),
}


def mid_channels(cin: int, cout: int, t: int = 3, d: int = 3) -> int:
    """M of the paper: t*d*d*cin*cout parameters split over a d x d spatial and a t temporal conv."""
    return (t * d * d * cin * cout) // (d * d * cin + t * cout)


class Conv2Plus1D(nn.Sequential):
    """1xdxd spatial conv (spatial stride), BN, ReLU, then 3x1x1 temporal conv (temporal stride)."""

    def __init__(self, cin, cout, stride=1, temporal_stride=None, mid=None, spatial=3):
        mid = mid or mid_channels(cin, cout)
        temporal_stride = stride if temporal_stride is None else temporal_stride
        super().__init__(
            nn.Conv3d(cin, mid, (1, spatial, spatial), (1, stride, stride),
                      (0, spatial // 2, spatial // 2), bias=False),
            nn.BatchNorm3d(mid), nn.ReLU(),
            nn.Conv3d(mid, cout, (3, 1, 1), (temporal_stride, 1, 1), (1, 0, 0), bias=False))


class BasicBlock(nn.Module):
    """Two (2+1)D convs with BN; ReLU between and after the residual add."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Sequential(Conv2Plus1D(cin, cout, stride), nn.BatchNorm3d(cout), nn.ReLU())
        self.conv2 = nn.Sequential(Conv2Plus1D(cout, cout), nn.BatchNorm3d(cout))
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv3d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm3d(cout))

    def forward(self, x):
        return (self.shortcut(x) + self.conv2(self.conv1(x))).relu()


class R2Plus1D(nn.Module):
    """(2+1)D stem (1x7x7 spatial stride 2, 3x1x1 temporal), four stages, global pool, linear."""

    def __init__(self, frames, crop, stem, widths, depths, classes):
        super().__init__()
        # 45 mid channels for 64 in the stem, as in the common R(2+1)D-18 implementations
        self.stem = nn.Sequential(Conv2Plus1D(3, stem, 2, 1, mid=45 * stem // 64, spatial=7),
                                  nn.BatchNorm3d(stem), nn.ReLU())
        blocks, cin = [], stem
        for s, (width, depth) in enumerate(zip(widths, depths)):
            for i in range(depth):
                blocks.append(BasicBlock(cin, width, 2 if s > 0 and i == 0 else 1))
                cin = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        return self.fc(self.pool(self.blocks(self.stem(x))).flatten(1))


def build(size: str = "small", seed: int = 0) -> R2Plus1D:
    """R(2+1)D-18 ("full") or a tiny one ("small") in eval mode, random weights and BN statistics."""
    return randomize(R2Plus1D(**CONFIGS[size]), seed)


def example_input(size: str = "small", batch: int = 1, seed: int = 0) -> torch.Tensor:
    """A random clip (N, 3, T, H, W)."""
    return video_clip(CONFIGS[size], batch, seed)


def main(argv=None) -> dict:
    """Compile R(2+1)D, verify E1 and report."""
    size = parse_size(argv, __doc__)
    model, clip = build(size), example_input(size)
    return {"exact": run(f"R(2+1)D ({size})", model, clip)}


if __name__ == "__main__":
    main()
