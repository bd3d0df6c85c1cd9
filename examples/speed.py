"""Step latency of every example against re-running its clip, eager, TorchScript and onnxruntime.

    python examples/speed.py [--size small|full] [--only x3d,tcn] [--rounds N] [--stream N] [--plot FILE.png]

One table from one run, one thread, batch 1. Per example: the time `cocompile.compile` takes (and
the first step, which traces the step graph); the latency of one step in three forms (the eager
`co.step`, the TorchScript artifact `co.export("x.pt")` called as `module(x, *state)`, and the ONNX
artifact in onnxruntime through `cocompile.runtime.Session(path, threads=1).step`) next to
re-running the clip (`model(clip)`); each step's speedup over the clip, also as a share of the
ideal `T / step_frames` (a step that brings in step_frames new frames of a T-frame clip can at best
cost that fraction of the clip); FLOPs per clip and per step (`flops.cocompile_flops`, which counts
Transformer encoders outside their fused fast path) and their ratio, which bounds the speedup where
the step must redo work (attention over the window), and the state bytes per stream.

Timing is interleaved: after a few untimed warm-up calls, every round runs the clip once and then
each step form for a stream of steps in a row, as a live stream calls it (one step per new chunk,
back to back; the steps that bring in one clip's frames, at most `--stream`; a step's time is the
mean over its stream), and the table shows the median
over rounds, so that the drift of a shared machine hits all columns alike. Steps carry their state
from round to round over the clip's chunks. `--stream 1` times one step right after each clip
(the clip has just flushed the caches: the slowest case).

Each example is measured in a Python process of its own (this script again, with `--in-process`
and one example), as a deployment runs one model per process: what an example measures then does
not depend on which examples the same process compiled, exported and timed before it (their freed
memory, allocator and cache state). `--in-process` measures every example in this process instead.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass

import torch

import cocompile
from bench_conv_stack import Stepper, interleaved
from common import state_bytes
from flops import cocompile_flops, import_example
from torchscript_runner import load as load_torchscript

# name: (example module, build() keyword arguments); the time axis is the module's TIME_DIM
EXAMPLES = {
    "x3d": ("x3d", {}),
    "r2plus1d": ("r2plus1d", {}),
    "slow_resnet": ("slow_resnet", {}),
    "tcn": ("tcn", {}),
    "st-gcn": ("stgcn", {"variant": "strided"}),
    "st-gcn-s1": ("stgcn", {"variant": "stride1"}),
    "oadtr": ("oadtr", {}),
    "audio_transformer": ("audio_transformer", {}),
}
FORMS = ("eager", "TorchScript", "onnxruntime")
WARMUP = 3


@dataclass
class Row:
    """One example's numbers; `ms` holds the median latency of "clip" and of each step form."""

    name: str
    input_shape: tuple
    clip_length: int
    step_frames: int
    compile_s: float
    first_step_s: float
    ms: dict
    clip_flops: int
    step_flops: int
    state_bytes: int

    @property
    def ideal(self) -> float:
        """Speedup of a step that costs exactly its frames' share of the clip."""
        return self.clip_length / self.step_frames

    def speedup(self, form: str) -> float:
        return self.ms["clip"] / self.ms[form]

    def share(self, form: str) -> float:
        return self.speedup(form) / self.ideal

    @property
    def flops_ratio(self) -> float:
        """Clip FLOPs over step FLOPs: the speedup the arithmetic alone allows."""
        return self.clip_flops / self.step_flops


# -- measuring -------------------------------------------------------------------------------------
def measure(name: str, size: str, rounds: int, stream: int = 10) -> Row:
    """Compile one example, write its artifacts to a temporary folder and time everything."""
    module, kwargs = EXAMPLES[name]
    mod = import_example(module)
    model, clip = mod.build(size, **kwargs), mod.example_input(size)
    t0 = time.perf_counter()
    co = cocompile.compile(model, clip, time_dim=mod.TIME_DIM)
    compile_s = time.perf_counter() - t0
    chunks = list(clip.split(co.step_frames, dim=co.time_dim))
    with torch.no_grad():
        t0 = time.perf_counter()
        co.step(chunks[0], co.initial_state(1))               # traces the step graph
        first_step_s = time.perf_counter() - t0
    flops = cocompile_flops(model, co, clip)
    with tempfile.TemporaryDirectory() as tmp:
        fns = step_functions(model, clip, co, chunks, export(co, tmp), min(stream, len(chunks)))
        with torch.no_grad():
            for _ in range(WARMUP - 1):                       # interleaved() warms up once more
                for fn in fns.values():
                    fn()
            seconds = interleaved(fns, rounds)
    ms = {k: v * 1e3 for k, v in seconds.items()}
    return Row(name, tuple(clip.shape), co.clip_length, co.step_frames, compile_s, first_step_s, ms,
               flops.clip, flops.step, state_bytes(co))


def export(co, folder: str) -> dict:
    """{"TorchScript": path.pt, "onnxruntime": path.onnx}, written by co.export."""
    paths = {"TorchScript": os.path.join(folder, "step.pt"),
             "onnxruntime": os.path.join(folder, "step.onnx")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in paths.values():
            t0 = time.perf_counter()
            co.export(path)
            log(f"  exported {os.path.basename(path)} in {time.perf_counter() - t0:.1f} s")
    return paths


def step_functions(model, clip, co, chunks, paths, stream: int) -> dict:
    """The calls to time, each step form on its own state, `stream` steps per call: {"clip": ...,
    "eager": ..., ...}."""
    from cocompile.runtime import Session

    script, meta = load_torchscript(paths["TorchScript"])
    n_out = len(meta["outputs"])
    sess = Session(paths["onnxruntime"], threads=1)
    return {
        "clip": lambda: model(clip),
        "eager": Stepper(lambda x, s: co.step(x, s)[1], co.initial_state(1), chunks, stream),
        "TorchScript": Stepper(lambda x, s: script(x, *s)[n_out:], co.initial_state(1), chunks, stream),
        "onnxruntime": Stepper(lambda x, s: sess.step(x, s)[1], sess.initial_state(1),
                               [c.numpy() for c in chunks], stream),
    }


# -- reporting -------------------------------------------------------------------------------------
COLUMNS = ("model", "input", "T / step", "compile s (+ first step)", "clip ms", "eager ms",
           "TorchScript ms", "onnxruntime ms", "eager x (of ideal)", "TorchScript x",
           "onnxruntime x", "ideal x", "GFLOPs clip / step", "FLOPs x", "state KiB")


def cells(r: Row) -> list[str]:
    """One table row as text."""
    speed = [f"{r.speedup(f):.1f}x ({r.share(f):.0%})" for f in FORMS]
    return [r.name, "x".join(map(str, r.input_shape[1:])), f"{r.clip_length} / {r.step_frames}",
            f"{r.compile_s:.1f} (+ {r.first_step_s:.1f})", f"{r.ms['clip']:.2f}",
            *(f"{r.ms[f]:.3f}" for f in FORMS), *speed, f"{r.ideal:.0f}x",
            f"{r.clip_flops / 1e9:.4g} / {r.step_flops / 1e9:.4g}", f"{r.flops_ratio:.1f}x",
            f"{r.state_bytes / 1024:.1f}"]


def format_table(rows: list[Row]) -> str:
    """A Markdown table (readable as is in a terminal)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def plot(rows: list[Row], path: str) -> bool:
    """Bar chart of each step form's speedup over the clip, with the ideal and the FLOPs ratio;
    False (and a message) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log(f"--plot {path}: matplotlib is not installed (pip install 'cocompile[bench]'); no plot")
        return False
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / (len(FORMS) + 1)
    for i, form in enumerate((*FORMS, "ideal")):
        values = [r.ideal if form == "ideal" else r.speedup(form) for r in rows]
        ax.bar([j + i * width for j in range(len(rows))], values, width, label=form,
               color="lightgrey" if form == "ideal" else None)
    centers = [j + 1.5 * width for j in range(len(rows))]
    ax.scatter(centers, [r.flops_ratio for r in rows], marker="_", s=900, color="black", zorder=3,
               label="FLOPs clip / step")
    ax.set_xticks(centers, [r.name for r in rows])
    ax.set_yscale("log")
    ax.set_ylim(bottom=1)
    ax.set_ylabel("speedup over re-running the clip")
    ax.set_title("cocompile step vs clip, 1 thread, batch 1 (ideal: T / step_frames)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def measure_apart(name: str, size: str, rounds: int, stream: int) -> Row:
    """`measure` in a child process (this script with --in-process and one example)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "row.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--in-process", "--only", name, "--size", size,
               "--rounds", str(rounds), "--stream", str(stream), "--json", out]
        if subprocess.run(cmd).returncode:
            raise SystemExit(f"measuring {name} failed (its error is above): {' '.join(cmd)}")
        with open(out) as f:
            row = json.load(f)[0]
    return Row(**{**row, "input_shape": tuple(row["input_shape"])})


def main(argv=None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("small", "full"), default="full")
    parser.add_argument("--only", default=",".join(EXAMPLES),
                        help="comma-separated examples (default all: " + ",".join(EXAMPLES) + ")")
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds (default 20)")
    parser.add_argument("--stream", type=int, default=10,
                        help="at most this many steps in a row per round and step form (default 10)")
    parser.add_argument("--plot", metavar="FILE.png", help="also plot the speedups (matplotlib)")
    parser.add_argument("--in-process", action="store_true",
                        help="measure every example in this process (default: a process each)")
    parser.add_argument("--json", metavar="FILE", help=argparse.SUPPRESS)   # a child's rows
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(names) - set(EXAMPLES))
    if unknown:
        parser.error(f"unknown example(s) {', '.join(unknown)}; choose from {', '.join(EXAMPLES)}")
    torch.set_num_threads(1)
    rows = []
    for name in names:
        if args.in_process:
            log(f"{name} ({args.size}) ...")
        run = measure if args.in_process else measure_apart
        rows.append(run(name, args.size, args.rounds, args.stream))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) for r in rows], f)
        return rows
    print(f"cocompile {cocompile.__version__}, torch {torch.__version__}, 1 thread, batch 1, "
          f"median of {args.rounds} interleaved rounds (per round: the clip once, then each step "
          f"form for min({args.stream}, T / step_frames) steps in a row), "
          f"{'all examples in one process' if args.in_process else 'each example in a process of its own'}")
    print(format_table(rows))
    if args.plot and plot(rows, args.plot):
        print(f"plot: {args.plot}")
    return rows


if __name__ == "__main__":
    main()
