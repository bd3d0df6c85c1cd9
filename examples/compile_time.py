"""What compile() costs, and how much of it is its own E1 check on the example clip.

    python examples/compile_time.py [--size small|full] [--only tcn,x3d]

Per example: the seconds of `cocompile.compile(..., verify=False)` (capture, analysis, rewrites,
step forms, states), then of the check `compile` runs by default before it returns (stepping the
example clip through the continual model, whose first step traces the step graph, plus one
offline forward), both after a warm-up compile of a tiny model so that one-time set-up is not
counted.
"""
from __future__ import annotations

import argparse
import time

import torch

import cocompile
from cocompile.verify import check_clip
from flops import import_example

EXAMPLES = ["tcn", "x3d", "slow_resnet", "stgcn", "crnn", "kws_lstm", "unet_audio", "video_unet", "slowfast",
            "conditioned_tcn"]


def measure(name: str, size: str) -> tuple[float, float]:
    mod = import_example(name)
    model, clip = mod.build(size), mod.example_input(size)
    t0 = time.perf_counter()
    co = cocompile.compile(model, clip, time_dim=getattr(mod, "TIME_DIM", 2), verify=False)
    t1 = time.perf_counter()
    check_clip(model, co, clip)
    return t1 - t0, time.perf_counter() - t1


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=("small", "full"), default="small")
    p.add_argument("--only", default=",".join(EXAMPLES))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cocompile.compile(torch.nn.Conv1d(2, 2, 3).eval(), torch.randn(1, 2, 8))   # one-time set-up
    rows = []
    print(f"{'example':<18}{'compile s':>11}{'E1 check s':>12}{'check share':>13}")
    for name in args.only.split(","):
        build, check = measure(name, args.size)
        rows.append((name, build, check))
        print(f"{name:<18}{build:>11.2f}{check:>12.2f}{check / (build + check):>12.0%}")
    return rows


if __name__ == "__main__":
    main()
