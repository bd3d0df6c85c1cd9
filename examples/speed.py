"""Step latency of every example against re-running its clip, in each runtime.

    python examples/speed.py [--size small|full] [--only x3d,tcn] [--rounds N] [--stream N] [--plot FILE.png]
                             [--together] [--runtimes eager,onnxruntime]

Two tables from one run, one thread, batch 1. Each step form is compared with the offline clip run
the same way (cocompile.bench): the eager `co.step` with `model(clip)`, the TorchScript artifact
`co.export("x.pt")` with the model traced by `torch.jit.trace`, the ONNX artifact in
`cocompile.runtime.Session(path, threads=1)` with the model exported by
`torch.onnx.export(model, clip, dynamo=True)` and run in onnxruntime with the same session options,
`co.compiled()` with `torch.compile(model)` (Inductor, freezing), and the AOTInductor package
`co.export("x.aoti.pt2")` with the offline model compiled into a package of its own (each called
through its package loader, as the C++ runner calls it). A runtime that cannot export the offline
model shows why instead of a number.

A third table puts each step beside its physical limit, the roofline bound of
`cocompile.bench.roofline`: max(step FLOPs / peak FLOP/s, (weights read + 2 x state) / bandwidth),
with the peak (a large float32 matmul) and the bandwidth (a large copy) measured once per run, on
one thread, by `bench.measure_machine`; "step / roofline" is a step's time over that bound.

The speedups table: per runtime, the clip's latency over the step's, also as a share of the ideal
`T / step_frames` (a step that brings in step_frames new frames of a T-frame clip can at best cost
that fraction of the clip), and the FLOPs ratio clip / step (`flops.cocompile_flops`, which counts
Transformer encoders outside their fused fast path), which bounds the speedup where a step must
redo work (attention over the window). The latencies table: compile time (and the first step,
which traces the step graph), clip and step milliseconds per runtime, FLOPs, state bytes per stream.

Timing is interleaved: after a few untimed calls, every round runs, runtime after runtime, the clip
once and then the step for a stream of steps in a row, as a live stream calls it (one step per new
chunk, back to back; the steps that bring in one clip's frames, at most `--stream`; a step's time is
the mean over its stream), and the tables show the median over rounds, so that the drift of a
shared machine hits all columns alike. Steps carry their state from round to round over the clip's
chunks. `--stream 1` times one step right after each clip (the clip has just flushed the caches:
the slowest case).

Each example in each runtime is measured in a Python process of its own (this script again, with
`--in-process`, one example and one runtime), as a deployment runs one model in one runtime per
process: what a runtime measures then does not depend on which examples and runtimes the same
process compiled, loaded and timed beside it (their weights and buffers in the caches, their
allocators and thread pools). Measured on the development CPU: the audio Transformer's AOTInductor
step took 0.49 ms in a process of its own and 0.94-1.18 ms timed beside the four other runtimes,
its clip 9.1 and 9.5-12.5 ms. `--in-process` measures every example and runtime in this process
instead; `--together` does too, and interleaves the examples as well: every round times every
example's clips and steps, so that the ratio of two examples' steps (the per-subset ST-GCN against the
stride-1 one) is taken under the same load.
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
from dataclasses import dataclass

import torch

import cocompile
from cocompile import bench
from common import state_bytes
from flops import cocompile_flops, import_example

# name: (example module, build() keyword arguments); the time axis is the module's TIME_DIM
EXAMPLES = {
    "x3d": ("x3d", {}),
    "r2plus1d": ("r2plus1d", {}),
    "slow_resnet": ("slow_resnet", {}),
    "tcn": ("tcn", {}),
    "st-gcn": ("stgcn", {"variant": "strided"}),
    "st-gcn-s1": ("stgcn", {"variant": "stride1"}),
    "st-gcn-subsets": ("stgcn", {"variant": "subsets"}),
    "oadtr": ("oadtr", {}),
    "audio_transformer": ("audio_transformer", {}),
}
RUNTIMES = tuple(bench.RUNTIMES)     # each a column group of the tables (--runtimes picks some)


@dataclass
class Row:
    """One example's numbers; `latency` holds, per runtime, the clip's and the step's medians."""

    name: str
    input_shape: tuple
    clip_length: int
    step_frames: int
    compile_s: float
    first_step_s: float
    latency: dict             # runtime -> bench.Latency (seconds)
    clip_flops: int
    step_flops: int
    state_bytes: int
    roofline: dict = dataclasses.field(default_factory=dict)   # bench.Roofline's fields

    @property
    def bound(self) -> bench.Roofline | None:
        """The step's roofline bound (None in rows measured without one)."""
        if not self.roofline:
            return None
        return bench.Roofline(**{**self.roofline, "machine": bench.Machine(**self.roofline["machine"])})

    @property
    def ideal(self) -> float:
        """Speedup of a step that costs exactly its frames' share of the clip."""
        return self.clip_length / self.step_frames

    def speedup(self, runtime: str) -> float | None:
        """The clip's latency over the step's, both in `runtime` (None: no clip there)."""
        return self.latency[runtime].speedup

    def share(self, runtime: str) -> float | None:
        return self.latency[runtime].share(self.ideal)

    @property
    def flops_ratio(self) -> float:
        """Clip FLOPs over step FLOPs: the speedup the arithmetic alone allows."""
        return self.clip_flops / self.step_flops

    @classmethod
    def from_json(cls, row: dict) -> "Row":
        latency = {k: bench.Latency(**v) for k, v in row["latency"].items()}
        return cls(**{**row, "input_shape": tuple(row["input_shape"]), "latency": latency})


# -- measuring -------------------------------------------------------------------------------------
def measure(name: str, size: str, rounds: int, stream: int = 10, machine: bench.Machine | None = None) -> Row:
    """Compile one example, write its artifacts and the offline model's exports to a temporary
    folder, and time the clip and the step in every runtime; the step's roofline on `machine`
    (measured here if not given)."""
    return measure_together([name], size, rounds, stream, machine)[0]


def measure_together(names: list[str], size: str, rounds: int, stream: int = 10,
                     machine: bench.Machine | None = None) -> list[Row]:
    """`measure` for several examples in this process, every clip and step of every example
    timed in each round (interleaved across examples too: their ratios share the machine's
    drift)."""
    machine = machine or bench.measure_machine()
    with tempfile.TemporaryDirectory() as tmp:
        prepared = [_prepare(name, size, stream, machine, os.path.join(tmp, name)) for name in names]
        with torch.no_grad():
            seconds = bench.interleaved({f"{p[0].name} {k}": fn for p in prepared for k, fn in p[1].items()},
                                        rounds)
    rows = []
    for row, _, why in prepared:
        row.latency = {rt: bench.Latency(rt, seconds.get(f"{row.name} {rt} clip"),
                                         seconds[f"{row.name} {rt} step"], why.get(rt, "")) for rt in RUNTIMES}
        rows.append(row)
    return rows


def _prepare(name: str, size: str, stream: int, machine: bench.Machine, folder: str) -> tuple:
    """(Row without latencies, {"<runtime> clip|step": call}, {runtime: why no clip}) of one
    example: compiled, its first step traced, FLOPs and roofline counted, artifacts written."""
    module, kwargs = EXAMPLES[name]
    mod = import_example(module)
    model, clip = mod.build(size, **kwargs), mod.example_input(size)
    t0 = time.perf_counter()
    co = cocompile.compile(model, clip, time_dim=mod.TIME_DIM)
    compile_s = time.perf_counter() - t0
    chunks = bench.chunks_of(co, clip)
    with torch.no_grad():
        t0 = time.perf_counter()
        co.step(chunks[0], co.initial_state(1))               # traces the step graph
        first_step_s = time.perf_counter() - t0
    flops = cocompile_flops(model, co, clip)
    bound = bench.roofline(co, machine)
    os.makedirs(folder, exist_ok=True)
    fns, why = bench.calls(model, clip, co, chunks, [bench.RUNTIMES[rt] for rt in RUNTIMES],
                           min(stream, len(chunks)), folder, log=lambda text: log(f"  {name}: {text}"))
    row = Row(name, tuple(clip.shape), co.clip_length, co.step_frames, compile_s, first_step_s,
              {}, flops.clip, flops.step, state_bytes(co), dataclasses.asdict(bound))
    return row, fns, why


# -- reporting -------------------------------------------------------------------------------------
# A table is a list of columns, each (header, cell of a row); a runtime adds its own columns.
def speedup_columns() -> list:
    return [("model", lambda r: r.name),
            ("input", lambda r: "x".join(map(str, r.input_shape[1:]))),
            ("T / step", lambda r: f"{r.clip_length} / {r.step_frames}"),
            ("ideal x", lambda r: f"{r.ideal:.0f}x"),
            *((f"{rt} x (of ideal)", lambda r, rt=rt: bench.ratio_cell(r.latency[rt], r.ideal))
              for rt in RUNTIMES),
            ("FLOPs x", lambda r: f"{r.flops_ratio:.1f}x")]


def latency_columns() -> list:
    per_runtime = [(f"{rt} {part} ms", lambda r, rt=rt, part=part:
                    bench.ms_cell(getattr(r.latency[rt], part), 2 if part == "clip" else 3))
                   for rt in RUNTIMES for part in ("clip", "step")]
    return [("model", lambda r: r.name),
            ("compile s (+ first step)", lambda r: f"{r.compile_s:.1f} (+ {r.first_step_s:.1f})"),
            *per_runtime,
            ("GFLOPs clip / step", lambda r: f"{r.clip_flops / 1e9:.4g} / {r.step_flops / 1e9:.4g}"),
            ("state KiB", lambda r: f"{r.state_bytes / 1024:.1f}")]


def roofline_columns() -> list:
    """Each step beside its roofline bound (see the module docstring)."""
    def bound(r, fn):
        return "n/a" if r.bound is None else fn(r.bound)
    return [("model", lambda r: r.name),
            ("MFLOPs / step", lambda r: bound(r, lambda b: f"{b.flops / 1e6:.4g}")),
            ("MB weights + 2 x state", lambda r: bound(r, lambda b: f"{b.weight_bytes / 1e6:.3g} + 2 x "
                                                                   f"{b.state_bytes / 1e6:.3g}")),
            ("roofline ms (bound by)", lambda r: bound(r, lambda b: f"{bench.ms_cell(b.bound)} ({b.limit})")),
            *((f"{rt} step / roofline", lambda r, rt=rt: bench.bound_cell(r.bound, r.latency[rt].step))
              for rt in RUNTIMES)]


def format_table(rows: list[Row], columns: list) -> str:
    """A Markdown table (readable as is in a terminal)."""
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r) for _, cell in columns) + " |" for r in rows]
    return "\n".join(lines)


def plot(rows: list[Row], path: str) -> bool:
    """Bar chart of each runtime's step speedup over its own clip, with the ideal and the FLOPs
    ratio; False (and a message) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log(f"--plot {path}: matplotlib is not installed (pip install 'cocompile[bench]'); no plot")
        return False
    fig, ax = plt.subplots(figsize=(10, 4.5))
    bars = (*RUNTIMES, "ideal")
    width = 0.8 / len(bars)
    lowest = 1.0
    for i, form in enumerate(bars):
        values = [r.ideal if form == "ideal" else (r.speedup(form) or 0) for r in rows]
        lowest = min([lowest] + [v for v in values if v > 0])
        ax.bar([j + i * width for j in range(len(rows))], values, width, label=form,
               color="lightgrey" if form == "ideal" else None)
    ax.axhline(1, color="grey", linewidth=0.8)          # below it the step is slower than the clip
    centers = [j + (len(bars) - 1) / 2 * width for j in range(len(rows))]
    ax.scatter(centers, [r.flops_ratio for r in rows], marker="_", s=900, color="black", zorder=3,
               label="FLOPs clip / step")
    ax.set_xticks(centers, [r.name for r in rows])
    ax.set_yscale("log")
    ax.set_ylim(bottom=lowest / 1.5)
    ax.set_ylabel("clip latency / step latency")
    ax.set_title("step vs clip in the same runtime, 1 thread, batch 1 (ideal: T / step_frames)")
    fig.legend(*ax.get_legend_handles_labels(), loc="lower center", ncol=len(bars) + 1)
    fig.tight_layout(rect=(0, 0.08, 1, 1))          # the legend below the axes, off the bars
    fig.savefig(path, dpi=120)
    return True


def _where(args) -> str:
    if args.together:
        return "all examples in one process, interleaved"
    if args.in_process:
        return "all examples in one process"
    return "each example in each runtime in a process of its own"


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def measure_apart(name: str, size: str, rounds: int, stream: int, machine: bench.Machine) -> Row:
    """`measure`, each runtime in a child process of its own (this script with --in-process, one
    example and one runtime); the row of the first, with every runtime's latencies."""
    rows = [_measure_child(name, size, rounds, stream, machine, rt) for rt in RUNTIMES]
    rows[0].latency = {rt: r.latency[rt] for rt, r in zip(RUNTIMES, rows)}
    return rows[0]


def _measure_child(name: str, size: str, rounds: int, stream: int, machine: bench.Machine, runtime: str) -> Row:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "row.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--in-process", "--only", name, "--size", size,
               "--rounds", str(rounds), "--stream", str(stream), "--json", out,
               "--machine", f"{machine.flops},{machine.bandwidth}", "--runtimes", runtime]
        if subprocess.run(cmd).returncode:
            raise SystemExit(f"measuring {name} in {runtime} failed (its error is above): {' '.join(cmd)}")
        with open(out) as f:
            return Row.from_json(json.load(f)[0])


def _use_runtimes(names: list[str]) -> None:
    """The runtimes this run times and its tables show (--runtimes)."""
    global RUNTIMES
    RUNTIMES = tuple(names)


def main(argv=None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("small", "full"), default="full")
    parser.add_argument("--only", default=",".join(EXAMPLES),
                        help="comma-separated examples (default all: " + ",".join(EXAMPLES) + ")")
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds (default 20)")
    parser.add_argument("--stream", type=int, default=10,
                        help="at most this many steps in a row per round and runtime (default 10)")
    parser.add_argument("--plot", metavar="FILE.png", help="also plot the speedups (matplotlib)")
    parser.add_argument("--in-process", action="store_true",
                        help="measure every example and runtime in this process (default: a process each)")
    parser.add_argument("--together", action="store_true",
                        help="measure the examples in this process with their clips and steps "
                             "interleaved in every round (to compare examples with each other)")
    parser.add_argument("--runtimes", default=",".join(bench.RUNTIMES),
                        help="comma-separated runtimes to time (default all: " + ",".join(bench.RUNTIMES) + ")")
    parser.add_argument("--json", metavar="FILE", help=argparse.SUPPRESS)   # a child's rows
    parser.add_argument("--machine", help=argparse.SUPPRESS)   # the parent's peak FLOP/s,bandwidth
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(names) - set(EXAMPLES))
    if unknown:
        parser.error(f"unknown example(s) {', '.join(unknown)}; choose from {', '.join(EXAMPLES)}")
    if args.rounds < 1 or args.stream < 1:
        parser.error("--rounds and --stream take a positive number")
    runtimes = [n.strip() for n in args.runtimes.split(",") if n.strip()]
    if not runtimes or set(runtimes) - set(bench.RUNTIMES):
        parser.error(f"--runtimes {args.runtimes!r}: choose from {', '.join(bench.RUNTIMES)}")
    _use_runtimes(runtimes)
    torch.set_num_threads(1)
    # the machine's peak and bandwidth, once per run (children get the parent's)
    machine = bench.Machine(*map(float, args.machine.split(","))) if args.machine else bench.measure_machine()
    if args.together:
        rows = measure_together(names, args.size, args.rounds, args.stream, machine)
    else:
        run = measure if args.in_process else measure_apart
        rows = [run(name, args.size, args.rounds, args.stream, machine) for name in names]
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) for r in rows], f)
        return rows
    print(f"cocompile {cocompile.__version__}, torch {torch.__version__}, 1 thread, batch 1, "
          f"median of {args.rounds} interleaved rounds (per round and runtime: the clip once, then "
          f"min({args.stream}, T / step_frames) steps in a row), "
          f"{_where(args)}")
    print("\nSpeedup of a step over re-running the clip, both in the same runtime (of ideal: the "
          "share of T / step_frames)\n")
    print(format_table(rows, speedup_columns()))
    print("\nLatencies (ms, medians), compile time, FLOPs and state\n")
    print(format_table(rows, latency_columns()))
    print(f"\nEach step beside its roofline bound on this machine ({machine})\n")
    print(format_table(rows, roofline_columns()))
    if args.plot and plot(rows, args.plot):
        print(f"plot: {args.plot}")
    return rows


if __name__ == "__main__":
    main()
