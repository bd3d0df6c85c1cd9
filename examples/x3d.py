"""X3D (Feichtenhofer, "X3D: Expanding Architectures for Efficient Video Recognition", CVPR 2020),
compiled into a continual model in the spirit of CoX3D (Hedegaard & Iosifidis 2022).

    python examples/x3d.py [--size small|s|full]

"full" is X3D-M: 16x224x224 clips, stage widths 24-48-96-192, depths 3-5-11-7, bottleneck expansion
2.25, SE (ratio 1/16) in every other block, head 432 -> pool -> 2048 -> 400 classes. "s" is X3D-S:
the same network on 13x160x160 clips.

Without SE the network compiles exactly. SE averages its input over the whole clip and scales every
frame by the result, so a frame's output would depend on frames that have not arrived yet: the
compiler refuses it unless approximate=True, where the average runs over the last T frames instead.
"""
from __future__ import annotations

import torch
from torch import nn

import cocompile
from common import parse_size, randomize, run, video_clip

TIME_DIM = 2
# (label, build kwargs, approximate) for the FLOPs table
VARIANTS = (("x3d", {"se": False}, False), ("x3d-se", {"se": True}, True))

CONFIGS = {
    "full": dict(frames=16, crop=224, stem=24, widths=(24, 48, 96, 192), depths=(3, 5, 11, 7),
                 expansion=2.25, fc=2048, classes=400),
    "s": dict(frames=13, crop=160, stem=24, widths=(24, 48, 96, 192), depths=(3, 5, 11, 7),
              expansion=2.25, fc=2048, classes=400),
    "small": dict(frames=8, crop=32, stem=8, widths=(8, 16, 24, 32), depths=(1, 2, 1, 1),
                  expansion=2.25, fc=64, classes=10),
}


def round_width(width: float, divisor: int = 8) -> int:
    """Channel count rounded to a multiple of `divisor`, never below 90% of `width` (as in X3D)."""
    out = max(divisor, int(width + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * width else out


def conv_bn(cin, cout, kernel, stride=1, padding=0, groups=1) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, kernel, stride, padding, groups=groups, bias=False),
                         nn.BatchNorm3d(cout))


class SqueezeExcite(nn.Module):
    """Channel gates from the clip average: x * sigmoid(fc2(relu(fc1(mean_{T,H,W} x))))."""

    def __init__(self, channels: int, ratio: float = 1 / 16):
        super().__init__()
        hidden = round_width(channels * ratio)
        self.fc1 = nn.Conv3d(channels, hidden, 1)
        self.fc2 = nn.Conv3d(hidden, channels, 1)

    def forward(self, x):
        s = x.mean(dim=(2, 3, 4), keepdim=True)
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))


class Bottleneck(nn.Module):
    """Inverted bottleneck: 1x1x1 expand, depthwise 3x3x3, (SE), swish, 1x1x1 project; residual."""

    def __init__(self, cin: int, cout: int, inner: int, stride: int, se: bool):
        super().__init__()
        self.expand = nn.Sequential(conv_bn(cin, inner, 1), nn.ReLU())
        self.depthwise = conv_bn(inner, inner, 3, (1, stride, stride), 1, groups=inner)
        self.se = SqueezeExcite(inner) if se else nn.Identity()
        self.swish = nn.SiLU()
        self.project = conv_bn(inner, cout, 1)
        shape_changes = cin != cout or stride != 1
        self.shortcut = conv_bn(cin, cout, 1, (1, stride, stride)) if shape_changes else nn.Identity()

    def forward(self, x):
        y = self.project(self.swish(self.se(self.depthwise(self.expand(x)))))
        return torch.relu(self.shortcut(x) + y)


class X3D(nn.Module):
    """Stem (1x3x3 stride 2 + depthwise 5x1x1), four stages of bottlenecks, X3D head."""

    def __init__(self, frames, crop, stem, widths, depths, expansion, fc, classes, se=True):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv3d(3, stem, (1, 3, 3), (1, 2, 2), (0, 1, 1), bias=False),
            nn.Conv3d(stem, stem, (5, 1, 1), padding=(2, 0, 0), groups=stem, bias=False),
            nn.BatchNorm3d(stem), nn.ReLU())
        blocks, cin = [], stem
        for width, depth in zip(widths, depths):
            inner = round_width(width * expansion)
            for i in range(depth):
                # SE in every other block, starting with each stage's first
                blocks.append(Bottleneck(cin, width, inner, 2 if i == 0 else 1, se and i % 2 == 0))
                cin = width
        self.blocks = nn.Sequential(*blocks)
        head = round_width(widths[-1] * expansion)
        side = crop // 32                          # stem and four stages halve the side each
        self.head = nn.Sequential(conv_bn(cin, head, 1), nn.ReLU(),
                                  nn.AvgPool3d((frames, side, side), stride=1),
                                  nn.Conv3d(head, fc, 1), nn.ReLU())
        self.classifier = nn.Linear(fc, classes)

    def forward(self, x):
        return self.classifier(self.head(self.blocks(self.stem(x))).flatten(1))


def build(size: str = "small", se: bool = False, seed: int = 0) -> X3D:
    """X3D-M ("full"), X3D-S ("s") or a tiny X3D ("small") in eval mode, random weights and
    BatchNorm statistics."""
    return randomize(X3D(**CONFIGS[size], se=se), seed)


def example_input(size: str = "small", batch: int = 1, seed: int = 0) -> torch.Tensor:
    """A random clip (N, 3, T, H, W) of the size the model was built for."""
    return video_clip(CONFIGS[size], batch, seed)


def full():
    """X3D-M and a 16x224x224 clip, for the CLI: `cocompile bench examples/x3d.py:full`."""
    return build("full"), example_input("full")


def x3d_s():
    """X3D-S and a 13x160x160 clip: `cocompile examples/x3d.py:x3d_s --out x3d_s.onnx`."""
    return build("s"), example_input("s")


class GlobalMean(nn.Module):
    """Average over time and space, keeping the axes: what the head's AvgPool3d computes on the
    clip it was built for."""

    def forward(self, x):
        return x.mean(dim=(2, 3, 4), keepdim=True)


def full_mean_head():
    """X3D-M with its head's average pool written as a mean (the same values on its 16x224x224
    clip). torch has no float16/bfloat16 avg_pool3d on the CPU; a mean runs in every dtype:
    `cocompile bench examples/x3d.py:full_mean_head --dtype bfloat16`."""
    model = build("full")
    model.head[2] = GlobalMean()
    return model, example_input("full")


def main(argv=None) -> dict:
    """Compile and verify X3D without SE (exact), show the SE refusal, then SE with approximate=True."""
    size = parse_size(argv, __doc__, CONFIGS)
    clip = example_input(size)
    out = {"exact": run(f"X3D ({size}, no SE)", build(size, se=False), clip)}
    model_se = build(size, se=True)
    try:
        cocompile.compile(model_se, clip)
        out["refusal"] = None
    except cocompile.CompileError as err:
        out["refusal"] = err
        print(f"\n== X3D ({size}, SE) without approximate=True is refused:\n{err}\n")
    out["approximate"] = run(f"X3D ({size}, SE, approximate)", model_se, clip, approximate=True)
    return out


if __name__ == "__main__":
    main()
