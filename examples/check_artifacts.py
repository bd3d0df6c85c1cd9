"""E4 for an example's artifacts: compile it, write .onnx, .pt and .pt2, and step each artifact
beside the eager continual model on independent random streams.

    python examples/check_artifacts.py EXAMPLE [--size small|full] [--clips 3] [--batch 2]

EXAMPLE names a module of examples/ (tcn, slowfast, crnn, ...). Each artifact steps `clips` clips'
worth of steps from the zero state with `batch` streams; every output and next state must agree
with `co.step` within 1e-5 relative (max|Δ| <= 1e-5·max(1, max|ref|)).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import cocompile
from cocompile.export import check_artifact
from flops import import_example


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("example")
    p.add_argument("--size", choices=("small", "full"), default="small")
    p.add_argument("--clips", type=int, default=3)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--formats", default=".onnx,.pt,.pt2")
    args = p.parse_args(argv)
    mod = import_example(args.example)
    model, clip = mod.build(args.size), mod.example_input(args.size)
    t0 = time.perf_counter()
    co = cocompile.compile(model, clip, time_dim=getattr(mod, "TIME_DIM", 2))
    print(f"{args.example} ({args.size}): compiled in {time.perf_counter() - t0:.1f}s, "
          f"step_frames {co.step_frames}, clip {co.clip_length} frames")
    reports = []
    with tempfile.TemporaryDirectory() as tmp:
        for suffix in args.formats.split(","):
            t0 = time.perf_counter()
            path = co.export(os.path.join(tmp, f"{args.example}{suffix}"))
            t1 = time.perf_counter()
            report = check_artifact(co, path, steps=args.clips * co.clip_length // co.step_frames,
                                    batch=args.batch)
            print(f"{report}  (export {t1 - t0:.1f}s, check {time.perf_counter() - t1:.1f}s)")
            reports.append(report)
    if not all(r.passed for r in reports):
        raise SystemExit(1)
    return reports


if __name__ == "__main__":
    main()
