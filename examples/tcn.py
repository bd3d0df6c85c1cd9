"""Temporal convolutional network (Bai, Kolter & Koltun, "An Empirical Evaluation of Generic
Convolutional and Recurrent Networks for Sequence Modeling", 2018) for audio or sensor streams,
compiled into a continual model.

    python examples/tcn.py [--size small|full]

Input (N, C, T), e.g. log-mel frames. Residual blocks of two dilated causal conv1d (dilations
1, 2, 4, 8; left zero padding only), ReLU, and a 1x1 conv on the residual where channels change.
Two outputs: per-frame logits (N, classes, T) and clip logits from the mean over time. Being causal,
the per-frame output has no delay: each step emits the logits of the frame it reads.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common import parse_size, randomize, run

TIME_DIM = 2
VARIANTS = (("tcn", {}, False),)

CONFIGS = {
    "full": dict(frames=128, channels=40, hidden=128, kernel=3, dilations=(1, 2, 4, 8), classes=35),
    "small": dict(frames=32, channels=8, hidden=32, kernel=3, dilations=(1, 2, 4, 8), classes=5),
}


class CausalConv1d(nn.Conv1d):
    """Dilated conv1d that sees only the present and the past: (k-1)*d zeros on the left."""

    def forward(self, x):
        return super().forward(F.pad(x, ((self.kernel_size[0] - 1) * self.dilation[0], 0)))


class TemporalBlock(nn.Module):
    """Two dilated causal convs with ReLU; residual through a 1x1 conv if the width changes."""

    def __init__(self, cin: int, cout: int, kernel: int, dilation: int):
        super().__init__()
        self.conv1 = CausalConv1d(cin, cout, kernel, dilation=dilation)
        self.conv2 = CausalConv1d(cout, cout, kernel, dilation=dilation)
        self.residual = nn.Conv1d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        y = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return torch.relu(y + self.residual(x))


class TCN(nn.Module):
    """Stack of temporal blocks with growing dilation, a per-frame and a clip-level head."""

    def __init__(self, frames, channels, hidden, kernel, dilations, classes):
        super().__init__()
        self.blocks = nn.Sequential(*[TemporalBlock(channels if i == 0 else hidden, hidden, kernel, d)
                                      for i, d in enumerate(dilations)])
        self.frame_head = nn.Conv1d(hidden, classes, 1)
        self.clip_head = nn.Linear(hidden, classes)

    def forward(self, x):
        h = self.blocks(x)
        return self.frame_head(h), self.clip_head(h.mean(dim=2))


def build(size: str = "small", seed: int = 0) -> TCN:
    """A TCN in eval mode with random weights."""
    return randomize(TCN(**CONFIGS[size]), seed)


def example_input(size: str = "small", batch: int = 1, seed: int = 0) -> torch.Tensor:
    """A random feature stream (N, C, T)."""
    cfg = CONFIGS[size]
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, cfg["channels"], cfg["frames"], generator=g)


def full():
    """The full-size model and its example clip, for the CLI: `cocompile examples/tcn.py:full ...`."""
    return build("full"), example_input("full")


def main(argv=None) -> dict:
    """Compile the TCN, verify E1 on both outputs and report."""
    size = parse_size(argv, __doc__)
    model, clip = build(size), example_input(size)
    return {"exact": run(f"TCN ({size})", model, clip)}


if __name__ == "__main__":
    main()
