"""Convolutional recurrent network (CRNN) for sound event detection (Cakir et al., "Convolutional
Recurrent Neural Networks for Polyphonic Sound Event Detection", 2017), compiled into a continual
model that tags each frame as the audio arrives.

    python examples/crnn.py [--size small|full]

Input (N, 1, T, mels): log-mel frames. Three conv blocks (3x3 conv with time and frequency padding,
BatchNorm, ReLU, max pooling over frequency; the second block also pools 2 frames into one), the
frequency axis folded into the channels, a 2-layer GRU (batch_first) and a per-frame Linear with a
sigmoid: event probabilities (N, T/2, classes). "full": 64 mels x 256 frames, widths 32-64-64,
GRU hidden 128, 10 classes.

Streaming, each conv keeps its last input frames, the GRU keeps its hidden state (the state of a
recurrent layer is all it remembers), and a step of 2 input frames emits one frame of
probabilities, 4 input frames after the newest frame it reads (each conv's padding waits for
the frame after its window's centre, the last one at half the frame rate).
"""
from __future__ import annotations

import torch
from torch import nn

from common import parse_size, randomize, run

TIME_DIM = 2
VARIANTS = (("crnn", {}, False),)

CONFIGS = {
    "full": dict(frames=256, mels=64, widths=(32, 64, 64), freq_pool=4, hidden=128, layers=2, classes=10),
    "small": dict(frames=16, mels=16, widths=(4, 8, 8), freq_pool=2, hidden=12, layers=2, classes=3),
}


def conv_block(cin: int, cout: int, pool: tuple[int, int]) -> nn.Sequential:
    """3x3 conv (padded in time and frequency), BatchNorm, ReLU, max pooling (time, frequency)."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(), nn.MaxPool2d(pool))


class CRNN(nn.Module):
    """Conv front end over (time, frequency), GRU over time, per-frame event probabilities."""

    def __init__(self, frames, mels, widths, freq_pool, hidden, layers, classes):
        super().__init__()
        pools = [(1, freq_pool), (2, freq_pool), (1, freq_pool)]      # the second halves the frame rate
        chans = (1, *widths)
        self.convs = nn.Sequential(*[conv_block(chans[i], chans[i + 1], p) for i, p in enumerate(pools)])
        features = widths[-1] * (mels // freq_pool ** 3)
        self.gru = nn.GRU(features, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        z = self.convs(x)                                   # (N, C, T/2, F)
        z = z.permute(0, 2, 1, 3).flatten(2)                # (N, T/2, C*F)
        y, _ = self.gru(z)
        return torch.sigmoid(self.head(y))                  # (N, T/2, classes)


def build(size: str = "small", seed: int = 0) -> CRNN:
    """A CRNN in eval mode with random weights and BatchNorm statistics."""
    return randomize(CRNN(**CONFIGS[size]), seed)


def example_input(size: str = "small", batch: int = 1, seed: int = 0) -> torch.Tensor:
    """Random log-mel frames (N, 1, T, mels)."""
    cfg = CONFIGS[size]
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1, cfg["frames"], cfg["mels"], generator=g)


def full():
    """The full-size model and its example clip, for the CLI: `cocompile examples/crnn.py:full ...`."""
    return build("full"), example_input("full")


def main(argv=None) -> dict:
    """Compile the CRNN, verify E1 and report."""
    size = parse_size(argv, __doc__)
    model, clip = build(size), example_input(size)
    return {"exact": run(f"CRNN ({size})", model, clip, time_dim=TIME_DIM)}


if __name__ == "__main__":
    main()
