"""A 1D audio U-Net (encoder-decoder over time, in the style of Wave-U-Net, Stoller et al. 2018, and
Demucs, Défossez et al. 2019) over frames of audio features, compiled into a continual model.

    python examples/unet_audio.py [--size small|full]

Input (N, C, T), e.g. 64 log-mel or learned filterbank channels. Each encoder level halves the frame
rate with a stride-2 conv1d; each decoder level doubles it again with ConvTranspose1d(k=4, s=2,
p=1) and concatenates the encoder's output of the same rate (the skip connection). The output is a
mask in [0, 1] per channel and frame, applied to the input (speech enhancement, source separation).

Streaming, every transposed conv keeps the partial sums of its next output frames as state, and
each skip connection is delayed until the decoder's frames catch up. A step reads 2^levels frames,
the least for which every level produces whole frames.
"""
from __future__ import annotations

import torch
from torch import nn

from common import parse_size, randomize, run

TIME_DIM = 2
VARIANTS = (("unet_audio", {}, False),)

CONFIGS = {
    "full": dict(frames=512, channels=64, widths=(64, 96, 128, 192, 256)),
    "small": dict(frames=32, channels=8, widths=(8, 12, 16, 24)),
}


def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Sequential:
    """conv1d (same padding), BatchNorm, ReLU."""
    return nn.Sequential(nn.Conv1d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm1d(cout),
                         nn.ReLU())


class Down(nn.Module):
    """Halve the frame rate (stride-2 conv, kernel 5), then a stride-1 conv."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.body = nn.Sequential(conv_bn(cin, cout, 5, stride=2), conv_bn(cout, cout, 3))

    def forward(self, x):
        return self.body(x)


class Up(nn.Module):
    """Double the frame rate (transposed conv, kernel 4, stride 2, padding 1: exactly 2x the frames),
    concatenate the skip connection of that rate, fuse with a conv."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.up = nn.Sequential(nn.ConvTranspose1d(cin, cout, 4, stride=2, padding=1, bias=False),
                                nn.BatchNorm1d(cout), nn.ReLU())
        self.fuse = conv_bn(2 * cout, cout, 3)

    def forward(self, x, skip):
        return self.fuse(torch.cat([self.up(x), skip], dim=1))


class AudioUNet(nn.Module):
    """Input conv, len(widths)-1 levels down and up again, a per-frame mask applied to the input."""

    def __init__(self, frames: int, channels: int, widths: tuple):
        super().__init__()
        self.inp = conv_bn(channels, widths[0], 3)
        self.downs = nn.ModuleList(Down(a, b) for a, b in zip(widths, widths[1:]))
        self.ups = nn.ModuleList(Up(b, a) for a, b in reversed(list(zip(widths, widths[1:]))))
        self.mask = nn.Conv1d(widths[0], channels, 1)

    def forward(self, x):
        h = self.inp(x)
        skips = []
        for down in self.downs:
            skips.append(h)
            h = down(h)
        for up in self.ups:
            h = up(h, skips.pop())
        return x * torch.sigmoid(self.mask(h))


def build(size: str = "small", seed: int = 0, **overrides) -> AudioUNet:
    """The U-Net in eval mode with random weights (`overrides` change the config, e.g. widths)."""
    return randomize(AudioUNet(**{**CONFIGS[size], **overrides}), seed)


def example_input(size: str = "small", batch: int = 1, seed: int = 0, frames: int | None = None) -> torch.Tensor:
    """A random feature stream (N, C, T)."""
    cfg = CONFIGS[size]
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, cfg["channels"], frames or cfg["frames"], generator=g)


def full():
    """The full-size model and its example clip, for the CLI: `cocompile examples/unet_audio.py:full ...`."""
    return build("full"), example_input("full")


def main(argv=None) -> dict:
    """Compile the U-Net, verify E1 and report."""
    size = parse_size(argv, __doc__)
    model, clip = build(size), example_input(size)
    return {"exact": run(f"audio U-Net ({size})", model, clip)}


if __name__ == "__main__":
    main()
