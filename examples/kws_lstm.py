"""Keyword spotting with a projected LSTM (LSTMP: Sak, Senior & Beaufays, "Long Short-Term Memory
Recurrent Neural Network Architectures for Large Scale Acoustic Modeling", 2014), compiled into a
continual model that scores the keywords at every new frame.

    python examples/kws_lstm.py [--size small|full]

Input (N, T, features): e.g. 40 log-mel or MFCC features per 10 ms frame. The model runs its
2-layer LSTM time-major ((T, N, F), a transpose inside forward) with proj_size (the hidden state
fed back is a projection of the cell output), and scores the keywords from the newest frame's
output, `y[-1]`. "full": 40 features x 100 frames (1 s), hidden 256, projection 64, 12 keywords.

Streaming, the state is each layer's projected h and cell state c; a step of one frame runs the
LSTM on that frame and the head on its output: the scores of the model on everything heard so far.
"""
from __future__ import annotations

import torch
from torch import nn

from common import parse_size, randomize, run

TIME_DIM = 1
VARIANTS = (("kws_lstm", {}, False),)

CONFIGS = {
    "full": dict(frames=100, features=40, hidden=256, proj=64, layers=2, keywords=12),
    "small": dict(frames=8, features=6, hidden=12, proj=5, layers=2, keywords=4),
}


class KeywordLSTM(nn.Module):
    """LSTMP over time-major frames; keyword scores from the newest frame."""

    def __init__(self, frames, features, hidden, proj, layers, keywords):
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, num_layers=layers, proj_size=proj)
        self.head = nn.Linear(proj, keywords)

    def forward(self, x):
        y, _ = self.lstm(x.transpose(0, 1))            # (T, N, proj)
        return self.head(y[-1])                         # (N, keywords)


def build(size: str = "small", seed: int = 0) -> KeywordLSTM:
    """A keyword-spotting LSTM in eval mode with random weights."""
    return randomize(KeywordLSTM(**CONFIGS[size]), seed)


def example_input(size: str = "small", batch: int = 1, seed: int = 0) -> torch.Tensor:
    """Random feature frames (N, T, features)."""
    cfg = CONFIGS[size]
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, cfg["frames"], cfg["features"], generator=g)


def full():
    """The full-size model and its example clip, for the CLI: `cocompile examples/kws_lstm.py:full ...`."""
    return build("full"), example_input("full")


def main(argv=None) -> dict:
    """Compile the keyword-spotting LSTM, verify E1 and report."""
    size = parse_size(argv, __doc__)
    model, clip = build(size), example_input(size)
    return {"exact": run(f"KWS LSTM ({size})", model, clip, time_dim=TIME_DIM)}


if __name__ == "__main__":
    main()
