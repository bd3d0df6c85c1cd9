"""A speaker-conditioned TCN: a side input that does not carry time, given with every step.

    python examples/conditioned_tcn.py [--size small|full]

Inputs `(frames, speaker)`: log-mel frames (N, C, T) and a per-stream speaker embedding (N, E), as in
speaker-adaptive keyword spotting or voice activity detection. Each residual block of dilated
causal convolutions (examples/tcn.py) is modulated by the embedding (FiLM: a per-channel scale and
shift computed from it). The embedding is constant along time; streaming, it is passed with every
step, and two streams in one batch may carry different speakers.
"""
from __future__ import annotations

import torch
from torch import nn

from common import parse_size, randomize, run
from tcn import TemporalBlock

TIME_DIM = (2, None)        # frames carry time on axis 2; the embedding carries none
CONFIGS = {
    "full": dict(frames=128, channels=40, hidden=128, embed=192, dilations=(1, 2, 4, 8), classes=12),
    "small": dict(frames=32, channels=8, hidden=16, embed=6, dilations=(1, 2, 4), classes=4),
}


class ConditionedTCN(nn.Module):
    """Temporal blocks, each followed by FiLM from the speaker embedding; per-frame logits."""

    def __init__(self, frames, channels, hidden, embed, dilations, classes):
        super().__init__()
        self.blocks = nn.ModuleList(TemporalBlock(channels if i == 0 else hidden, hidden, 3, d)
                                    for i, d in enumerate(dilations))
        self.film = nn.ModuleList(nn.Linear(embed, 2 * hidden) for _ in dilations)
        self.head = nn.Conv1d(hidden, classes, 1)

    def forward(self, frames, speaker):
        h = frames
        for block, film in zip(self.blocks, self.film):
            scale, shift = film(speaker).unsqueeze(-1).chunk(2, dim=1)
            h = block(h) * (1 + scale) + shift
        return self.head(h)


def build(size: str = "small", seed: int = 0) -> ConditionedTCN:
    """The model in eval mode with random weights."""
    return randomize(ConditionedTCN(**CONFIGS[size]), seed)


def example_input(size: str = "small", batch: int = 1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(frames (N, C, T), speaker embedding (N, E)), random."""
    cfg = CONFIGS[size]
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, cfg["channels"], cfg["frames"], generator=g),
            torch.randn(batch, cfg["embed"], generator=g))


def full():
    """The full-size model and its example input, for the CLI."""
    return build("full"), example_input("full")


def main(argv=None) -> dict:
    """Compile the conditioned TCN, verify E1 and report."""
    size = parse_size(argv, __doc__)
    model, clip = build(size), example_input(size)
    return {"exact": run(f"speaker-conditioned TCN ({size})", model, clip, time_dim=TIME_DIM)}


if __name__ == "__main__":
    main()
