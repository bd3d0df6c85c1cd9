"""Transformer encoders over a sliding window of tokens: exactness and FLOPs per step.

    python examples/encoder_bench.py [--quick]

Part 1 compiles `nn.TransformerEncoder` with 1, 2, 3 and 6 layers, post-norm and pre-norm, a head
on the newest token or on the token mean, d in {64, 256} and n in {16, 64} tokens
(dim_feedforward = 4d), and checks E1 on a clip and E2 over 2n steps past it, printing the step
form of each attention (single-output, window). Part 2 counts FLOPs per step against the offline
window (n = 64, d = 256) beside the analytic optimum of an exact continual step: the new token's
projections, one query's attention for a newest-token head, and for the layers whose every
output a later layer reads, a retroactive attention update (one key added and one removed per
query, 8nd) with everything after it on all n tokens. cocompile re-forms those layers' attention
from cached per-token projections instead (4n^2*d, exact, no cancellation of exponentials).
`--quick` runs a few small configurations (what the tests run).
"""
from __future__ import annotations

import argparse
import itertools
import time

import torch
from torch import nn

import cocompile
from cocompile.inspect import count_flops
from cocompile.ops.attention import MODE


class Encoder(nn.Module):
    """nn.TransformerEncoder on (N, n, d) tokens; head on the newest token or the mean."""

    def __init__(self, d, layers, norm_first, head):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.1, batch_first=True,
                                           norm_first=norm_first)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head, self.out = head, nn.Linear(d, 10)

    def forward(self, x):
        y = self.enc(x)
        return self.out(y[:, -1] if self.head == "newest" else y.mean(1))


def optimum(layers: int, n: int, d: int, head: str) -> int:
    """Analytic FLOPs (2 per multiply-add) of an exact continual step of the encoder body."""
    proj, out, ff = 6 * d * d, 2 * d * d, 16 * d * d      # q/k/v, output projection, FFN
    one_query, window_attn, retro = 4 * n * d, 4 * n * n * d, 8 * n * d
    if layers == 1 and head == "newest":
        return proj + one_query + out + ff
    total = proj + retro + n * (out + ff)                   # layer 1: every output changes
    middle = layers - 2 if head == "newest" else layers - 1
    total += middle * (n * (proj + out + ff) + window_attn)
    if head == "newest":                                     # last layer: newest query only
        total += n * (proj * 2 // 3) + proj // 3 + one_query + out + ff
    return total


def check(layers, norm_first, head, d, n):
    """(E1 error, E2 error, passed, attention forms, compile seconds) of one configuration."""
    torch.manual_seed(layers * 1000 + d + n)
    model = Encoder(d, layers, norm_first, head).eval()
    t0 = time.perf_counter()
    co = cocompile.compile(model, torch.randn(1, n, d), time_dim=1, trace=False)
    seconds = time.perf_counter() - t0
    report = cocompile.verify(model, co, torch.randn(2, n, d), sliding_steps=2 * n)
    kinds = [node.meta[MODE].kind for node in co.program.gm.graph.nodes if MODE in node.meta]
    return report.max_error("E1"), report.max_error("E2"), report.passed, kinds, seconds


def flops(layers, head, d=256, n=64):
    """(window FLOPs, step FLOPs, analytic optimum) of the encoder with the given head."""
    model = Encoder(d, layers, False, head).eval()
    co = cocompile.compile(model, torch.randn(1, n, d), time_dim=1, trace=False)
    step, clip = count_flops(co)
    head_flops = 2 * d * 10
    return sum(clip.values()), sum(step.values()), optimum(layers, n, d, head) + head_flops


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few small configurations")
    args = parser.parse_args(argv)
    if args.quick:
        grid = [(1, False, "newest", 32, 8), (2, True, "mean", 32, 8)]
        table = [(1, "newest", 64, 16), (2, "newest", 64, 16)]
    else:
        grid = list(itertools.product((1, 2, 3, 6), (False, True), ("newest", "mean"), (64, 256),
                                      (16, 64)))
        table = [(layers, head, 256, 64) for layers in (1, 2, 3, 6) for head in ("newest", "mean")]
    print(f"{'layers':>6} {'norm':>5} {'head':>7} {'d':>4} {'n':>3} {'E1 err':>9} "
          f"{'E2 err':>9} {'ok':>3} {'compile':>8}  attention forms")
    results = []
    for cfg in grid:
        e1, e2, ok, kinds, seconds = check(*cfg)
        results.append((cfg, e1, e2, ok))
        layers, norm_first, head, d, n = cfg
        print(f"{layers:>6} {'pre' if norm_first else 'post':>5} {head:>7} {d:>4} {n:>3} "
              f"{e1:>9.2e} {e2:>9.2e} {'yes' if ok else 'NO':>3} {seconds:>7.1f}s  {','.join(kinds)}")
    print(f"\nFLOPs per step, d = {table[0][2]}, n = {table[0][3]}, dim_feedforward = 4d, post-norm")
    print(f"{'layers':>6} {'head':>7} {'window MFLOPs':>14} {'step MFLOPs':>12} {'optimum':>9} "
          f"{'window/step':>12} {'window/optimum':>15}")
    ratios = {}
    for layers, head, d, n in table:
        window, step, best = flops(layers, head, d, n)
        ratios[(layers, head)] = window / step
        print(f"{layers:>6} {head:>7} {window / 1e6:>14.2f} {step / 1e6:>12.2f} {best / 1e6:>9.2f} "
              f"{window / step:>11.1f}x {window / best:>14.1f}x")
    return {"grid": results, "ratios": ratios}


if __name__ == "__main__":
    main()
