"""An audio-frame classifier with a causal Transformer encoder, compiled into a continual model.

    python examples/audio_transformer.py [--size small|full]

Input (N, T, M): log-mel frames (M = 64 bands, 10 ms hop). A Linear embeds each frame, a pre-norm
encoder attends causally within a band (each frame sees itself and the previous `band - 1`
frames: 320 ms at full size), and a Linear classifies every frame (e.g. speech / music / noise
events). Being causal, the per-frame output has no delay.

Continual form: every attention keeps a key/value cache of `band - 1` frames and computes one
new frame per step. The stream equals the offline model run on the whole stream, however long
(E3), because the band, not the clip, bounds what each frame sees.
"""
from __future__ import annotations

import torch
from torch import nn

from common import parse_size, randomize, run

TIME_DIM = 1
CONFIGS = {
    "full": dict(frames=128, mels=64, d=192, heads=4, layers=4, band=32, classes=10),
    "small": dict(frames=32, mels=16, d=32, heads=4, layers=2, band=8, classes=4),
}


class CausalFrameClassifier(nn.Module):
    """Frame embedding + banded causal pre-norm encoder + per-frame classifier."""

    def __init__(self, frames, mels, d, heads, layers, band, classes):
        super().__init__()
        self.band = band
        self.embed = nn.Linear(mels, d)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.1, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.classifier = nn.Linear(d, classes)

    def forward(self, x):
        t = x.size(1)
        lag = torch.arange(t)[:, None] - torch.arange(t)[None, :]
        hidden = (lag < 0) | (lag >= self.band)          # True: may not attend
        h = self.encoder(self.embed(x), mask=hidden, is_causal=False)
        return self.classifier(h)


def build(size: str = "small", seed: int = 0) -> CausalFrameClassifier:
    """The classifier in eval mode with random weights."""
    return randomize(CausalFrameClassifier(**CONFIGS[size]), seed)


def example_input(size: str = "small", batch: int = 1, seed: int = 0) -> torch.Tensor:
    """Random log-mel frames (N, T, M)."""
    cfg = CONFIGS[size]
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, cfg["frames"], cfg["mels"], generator=g)


def full():
    """The full-size model and its example clip: `cocompile examples/audio_transformer.py:full
    --time-dim 1`."""
    return build("full"), example_input("full")


def main(argv=None) -> dict:
    """Compile the classifier, verify E1 and report FLOPs."""
    size = parse_size(argv, __doc__)
    model, clip = build(size), example_input(size)
    return {"exact": run(f"causal audio Transformer ({size})", model, clip, time_dim=TIME_DIM)}


if __name__ == "__main__":
    main()
