"""Slow pathway of SlowFast (Feichtenhofer et al., "SlowFast Networks for Video Recognition",
ICCV 2019) as a Slow-only ResNet, compiled into a continual model.

    python examples/slow_resnet.py [--size small|full]

"full" is Slow-only ResNet-50 on 16x224x224 clips: the 1x7x7 stem conv strides 2 in time (8 frames
remain) and space, then a 1x3x3 max pool; bottlenecks have temporal kernel 1 in res2/res3 and a
3x1x1 first conv in res4/res5 (the paper finds temporal convs hurt in early stages).
"""
from __future__ import annotations

import torch
from torch import nn

from common import parse_size, randomize, run, video_clip

TIME_DIM = 2
VARIANTS = (("slow_resnet", {}, False),)

CONFIGS = {
    "full": dict(frames=16, crop=224, stem=64, inner=(64, 128, 256, 512), depths=(3, 4, 6, 3),
                 classes=400),
    "small": dict(frames=8, crop=32, stem=8, inner=(8, 16, 24, 32), depths=(1, 1, 1, 1),
                  classes=10),
}
EXPANSION = 4
TEMPORAL_KERNEL = (1, 1, 3, 3)      # res2..res5


def conv_bn(cin, cout, kernel, stride=1, padding=0) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, kernel, stride, padding, bias=False), nn.BatchNorm3d(cout))


class Bottleneck(nn.Module):
    """kt x1x1 conv (kt = 1 or 3), 1x3x3 conv (spatial stride), 1x1x1 conv to 4x width; residual."""

    def __init__(self, cin: int, inner: int, stride: int, kt: int):
        super().__init__()
        cout = inner * EXPANSION
        self.a = nn.Sequential(conv_bn(cin, inner, (kt, 1, 1), padding=(kt // 2, 0, 0)), nn.ReLU())
        self.b = nn.Sequential(conv_bn(inner, inner, (1, 3, 3), (1, stride, stride), (0, 1, 1)), nn.ReLU())
        self.c = conv_bn(inner, cout, 1)
        shape_changes = cin != cout or stride != 1
        self.shortcut = conv_bn(cin, cout, 1, (1, stride, stride)) if shape_changes else nn.Identity()

    def forward(self, x):
        return torch.relu(self.shortcut(x) + self.c(self.b(self.a(x))))


class SlowResNet(nn.Module):
    """Stem (1x7x7, stride 2x2x2; max pool 1x3x3), res2..res5, global average pool, linear."""

    def __init__(self, frames, crop, stem, inner, depths, classes):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, stem, (1, 7, 7), (2, 2, 2), (0, 3, 3)), nn.ReLU(),
                                  nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1)))
        blocks, cin = [], stem
        for s, (width, depth, kt) in enumerate(zip(inner, depths, TEMPORAL_KERNEL)):
            for i in range(depth):
                blocks.append(Bottleneck(cin, width, 2 if s > 0 and i == 0 else 1, kt))
                cin = width * EXPANSION
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        return self.fc(self.pool(self.blocks(self.stem(x))).flatten(1))


def build(size: str = "small", seed: int = 0) -> SlowResNet:
    """Slow-only R50 ("full") or a tiny one ("small") in eval mode, random weights and BN statistics."""
    return randomize(SlowResNet(**CONFIGS[size]), seed)


def example_input(size: str = "small", batch: int = 1, seed: int = 0) -> torch.Tensor:
    """A random clip (N, 3, T, H, W)."""
    return video_clip(CONFIGS[size], batch, seed)


def main(argv=None) -> dict:
    """Compile the Slow ResNet, verify E1 and report."""
    size = parse_size(argv, __doc__)
    model, clip = build(size), example_input(size)
    return {"exact": run(f"Slow ResNet ({size})", model, clip)}


if __name__ == "__main__":
    main()
