"""An OadTR-style online action detector (after Wang et al., "OadTR: Online Action Detection with
Transformers", ICCV 2021), compiled into a continual model.

    python examples/oadtr.py [--size small|full]

Input (N, T, F): one feature vector per video frame (e.g. 2048-d two-stream features), a window
of T = 64. A Linear embeds each feature, a learned position table is added, a post-norm
Transformer encoder reads the window, and a classifier reads the newest token: the action
happening now (22 classes, THUMOS'14's 20 actions plus ambiguous and background).

Continual form: the position table is folded through the first layer's query/key/value
projections, so each frame's projections are computed once and cached; the first layers are
re-run over the window from those caches; the last layer computes only the newest token's query
(single-output attention).
"""
from __future__ import annotations

import torch
from torch import nn

from common import parse_size, randomize, run

TIME_DIM = 1
CONFIGS = {
    "full": dict(frames=64, features=2048, d=512, heads=8, layers=3, classes=22),
    "small": dict(frames=16, features=64, d=64, heads=4, layers=2, classes=5),
}


class OnlineDetector(nn.Module):
    """Feature embedding + learned positions + post-norm encoder + newest-token classifier."""

    def __init__(self, frames, features, d, heads, layers, classes):
        super().__init__()
        self.embed = nn.Linear(features, d)
        self.positions = nn.Parameter(0.02 * torch.randn(1, frames, d))
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.classifier = nn.Linear(d, classes)

    def forward(self, x):
        tokens = self.embed(x) + self.positions
        return self.classifier(self.encoder(tokens)[:, -1])


def build(size: str = "small", seed: int = 0) -> OnlineDetector:
    """The detector in eval mode with random weights."""
    model = randomize(OnlineDetector(**CONFIGS[size]), seed)
    with torch.no_grad():                        # keep the position table's learned scale
        model.positions.normal_(std=0.02)
    return model


def example_input(size: str = "small", batch: int = 1, seed: int = 0) -> torch.Tensor:
    """Random frame features (N, T, F)."""
    cfg = CONFIGS[size]
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, cfg["frames"], cfg["features"], generator=g)


def full():
    """The full-size model and its example window: `cocompile examples/oadtr.py:full --time-dim 1`."""
    return build("full"), example_input("full")


def main(argv=None) -> dict:
    """Compile the detector, verify E1 and E2 and report FLOPs."""
    size = parse_size(argv, __doc__)
    model, clip = build(size), example_input(size)
    return {"exact": run(f"OadTR-style detector ({size})", model, clip, time_dim=TIME_DIM)}


if __name__ == "__main__":
    main()
