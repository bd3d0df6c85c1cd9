"""The continual models on a CUDA device: E1 there, and step vs clip latency, eager and replayed
from a CUDA graph, for 1 and 16 streams.

    python examples/gpu_check.py [--size full|small] [--rounds 50] [--dtype float32|float16]

Models: X3D-M (examples/x3d.py) and the stride-1 ST-GCN (examples/stgcn.py). Each is compiled on
the GPU (model and example clip moved there first), checked against the offline model on the
GPU (E1, cocompile.verify), then timed: the clip (model(clip)), the eager step (co.step) and the
step replayed from a CUDA graph (co.cuda_graph), each for a batch of 1 and of 16 streams, as the
median over `--rounds` rounds after warm-up, with torch.cuda.synchronize around every timed call.
Without a CUDA device it says so and exits with status 0 (nothing to check).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import cocompile
import stgcn
import x3d

MODELS = {"x3d-m": (x3d, {}), "st-gcn-s1": (stgcn, {"variant": "stride1"})}
BATCHES = (1, 16)


def timed(fn, rounds: int, warmup: int = 3) -> float:
    """Median seconds of fn() over `rounds` calls, each waited for on the device."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def check(name: str, size: str, dtype: torch.dtype, rounds: int) -> list[dict]:
    """E1 on the GPU, then one row per batch size: clip, eager step, CUDA-graph step (ms)."""
    mod, kwargs = MODELS[name]
    model = mod.build(size, **kwargs).to("cuda", dtype)
    clip = mod.example_input(size).to("cuda", dtype)
    co = cocompile.compile(model, clip, time_dim=mod.TIME_DIM)
    report = cocompile.verify(model, co, clip, sliding_steps=0)
    rows = []
    for batch in BATCHES:
        clips = mod.example_input(size, batch=batch).to("cuda", dtype)
        chunk = clips.narrow(mod.TIME_DIM, 0, co.step_frames).contiguous()
        state = [co.initial_state(batch)]
        graphed = co.cuda_graph(batch)
        with torch.no_grad():
            ms = {"clip": timed(lambda: model(clips), rounds),
                  "eager step": timed(lambda: state.__setitem__(0, co.step(chunk, state[0])[1]), rounds),
                  "graph step": timed(lambda: graphed(chunk), rounds)}
        rows.append({"model": name, "batch": batch, "E1": report.max_error("E1"),
                     "passed": report.passed, **{k: v * 1e3 for k, v in ms.items()},
                     "ideal": co.clip_length / co.step_frames})
    return rows


def format_table(rows: list[dict]) -> str:
    head = (f"{'model':<11}{'batch':>6}{'E1 |err|':>10}{'clip ms':>10}{'eager step':>12}"
            f"{'graph step':>12}{'clip/eager':>11}{'clip/graph':>11}{'ideal':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['model']:<11}{r['batch']:>6}{r['E1']:>10.2g}{r['clip']:>10.3f}"
                     f"{r['eager step']:>12.3f}{r['graph step']:>12.3f}"
                     f"{r['clip'] / r['eager step']:>10.1f}x{r['clip'] / r['graph step']:>10.1f}x"
                     f"{r['ideal']:>6.0f}x")
    return "\n".join(lines)


def main(argv=None) -> list[dict] | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("small", "full"), default="full")
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    parser.add_argument("--only", nargs="*", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False); nothing to check")
        return None
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, {args.dtype}, "
          f"size {args.size}", flush=True)
    rows = []
    for name in args.only:
        rows += check(name, args.size, getattr(torch, args.dtype), args.rounds)
        print(format_table(rows[-len(BATCHES):]).splitlines()[-1], flush=True)
    print(format_table(rows))
    if not all(r["passed"] for r in rows):
        print("gpu_check: E1 FAILED on the GPU", file=sys.stderr)
        sys.exit(1)
    return rows


if __name__ == "__main__":
    main()
