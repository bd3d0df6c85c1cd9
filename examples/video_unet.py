"""A 3D video U-Net for frame prediction (an encoder-decoder over time and space, as in video
prediction and video restoration networks), compiled into a continual model.

    python examples/video_unet.py [--size small|full]

Input (N, 3, T, H, W). Two encoder levels halve time and space with stride-2 Conv3d; two decoder
levels double them again with ConvTranspose3d(k=4, s=2, p=1), each added to the encoder output of
its rate (skip connections). The head predicts, for every frame, the next frame as a residual.

Streaming, each ConvTranspose3d upsamples along time by overlap-add: it keeps the partial sums of
the next output frames as state and emits two frames per input frame; a step reads 4 frames.
"""
from __future__ import annotations

import torch
from torch import nn

from common import parse_size, randomize, run, video_clip

TIME_DIM = 2
VARIANTS = (("video_unet", {}, False),)

CONFIGS = {
    "full": dict(frames=16, crop=64, width=24),
    "small": dict(frames=16, crop=16, width=4),
}


def conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    """3x3x3 conv (same padding), BatchNorm, ReLU."""
    return nn.Sequential(nn.Conv3d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm3d(cout), nn.ReLU())


def up_bn(cin: int, cout: int) -> nn.Sequential:
    """Transposed 4x4x4 conv with stride 2 and padding 1 (exactly twice the frames and pixels),
    BatchNorm, ReLU."""
    return nn.Sequential(nn.ConvTranspose3d(cin, cout, 4, stride=2, padding=1, bias=False),
                         nn.BatchNorm3d(cout), nn.ReLU())


class VideoUNet(nn.Module):
    """stem -> down -> down -> bottleneck -> up (+ skip) -> up (+ skip) -> next-frame residual."""

    def __init__(self, frames: int, crop: int, width: int):
        super().__init__()
        w = width
        self.stem = conv_bn(3, w)
        self.down1, self.down2 = conv_bn(w, 2 * w, stride=2), conv_bn(2 * w, 4 * w, stride=2)
        self.bottleneck = conv_bn(4 * w, 4 * w)
        self.up2, self.up1 = up_bn(4 * w, 2 * w), up_bn(2 * w, w)
        self.head = nn.Conv3d(w, 3, (1, 3, 3), padding=(0, 1, 1))

    def forward(self, x):
        s0 = self.stem(x)
        s1 = self.down1(s0)
        h = self.bottleneck(self.down2(s1))
        h = self.up2(h) + s1
        h = self.up1(h) + s0
        return x + self.head(h)


def build(size: str = "small", seed: int = 0) -> VideoUNet:
    """The video U-Net in eval mode with random weights."""
    return randomize(VideoUNet(**CONFIGS[size]), seed)


def example_input(size: str = "small", batch: int = 1, seed: int = 0) -> torch.Tensor:
    """A random clip (N, 3, T, H, W)."""
    return video_clip(CONFIGS[size], batch, seed)


def full():
    """The full-size model and its example clip, for the CLI: `cocompile examples/video_unet.py:full ...`."""
    return build("full"), example_input("full")


def main(argv=None) -> dict:
    """Compile the video U-Net, verify E1 and report."""
    size = parse_size(argv, __doc__)
    model, clip = build(size), example_input(size)
    return {"exact": run(f"video U-Net ({size})", model, clip)}


if __name__ == "__main__":
    main()
