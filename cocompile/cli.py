"""The `cocompile` command (DESIGN.md §8). Exit codes: 0 ok, 1 verification failed, 2 usage/input error.

    cocompile MODEL --out co_model.onnx [--input-shape 1,3,16,112,112] [--time-dim 2] [--step-frames C]
                                        [--approximate] [--no-verify] [--trust-pickle] [--weights FILE]
    cocompile inspect MODEL             per-layer table: window, lag, receptive field, state, FLOPs
    cocompile verify MODEL ARTIFACT     E1 of the model's compilation, E4 of the artifact
    cocompile bench MODEL               step vs clip latency on one thread; eager, TorchScript and
                                        onnxruntime steps side by side (--eager-only: skip those)

MODEL: a torch.export archive, `pkg.module:factory`, or (with --trust-pickle) a pickled module.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import threading
import time
import warnings

import torch
from torch.utils.flop_counter import FlopCounterMode

import cocompile

from .errors import CompileError
from .loading import InputError, load_artifact, load_model

COMMANDS = ("inspect", "verify", "bench")
OK, FAILED, USAGE = 0, 1, 2


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `cocompile` script; returns (and exits with) the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv and argv[0] in COMMANDS else "compile"
    try:
        args = _parser(command).parse_args(argv[1:] if command != "compile" else argv)
    except SystemExit as exit_:               # argparse already printed the usage and the reason
        return USAGE if exit_.code else OK
    warnings.showwarning = _show_warning
    try:
        code = {"compile": cmd_compile, "inspect": cmd_inspect, "verify": cmd_verify,
                "bench": cmd_bench}[command](args)
    except (InputError, CompileError) as err:
        print(f"cocompile: error: {err}", file=sys.stderr)
        code = USAGE
    return code


# -- arguments -------------------------------------------------------------------------------------
def _parser(command: str) -> argparse.ArgumentParser:
    prog = "cocompile" if command == "compile" else f"cocompile {command}"
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0],
                                epilog="subcommands: cocompile inspect|verify|bench MODEL ...")
    p.add_argument("model", metavar="MODEL", help="torch.export archive, pkg.module:factory, or pickled module")
    if command == "verify":
        p.add_argument("artifact", metavar="ARTIFACT", help="artifact written by cocompile (.onnx, .pt, .pt2)")
    if command == "compile":
        p.add_argument("--out", required=True, help="artifact to write: .onnx, .pt (TorchScript) or .pt2")
        p.add_argument("--no-verify", action="store_true", help="skip the E1/E4 checks")
        p.add_argument("--triton-repo", metavar="DIR",
                       help="also write a Triton model repository for the .onnx artifact")
    if command == "bench":
        p.add_argument("--steps", type=int, default=200, help="steps to time (default 200)")
        p.add_argument("--artifact", help="also time this ONNX artifact in onnxruntime")
        p.add_argument("--eager-only", action="store_true",
                       help="skip timing the TorchScript and ONNX artifacts beside the eager step")
    p.add_argument("--input-shape", help="example input shape, e.g. 1,3,16,112,112 (batch first)")
    p.add_argument("--time-dim", type=int, default=None, help="axis of the frames (default 2)")
    p.add_argument("--step-frames", type=int, default=None, help="frames per step (default: smallest)")
    p.add_argument("--approximate", action="store_true", help="allow causal approximations")
    p.add_argument("--trust-pickle", action="store_true", help="allow loading a pickled module (runs its code)")
    p.add_argument("--weights", help="state dict for a pkg.module:factory MODEL (loaded weights-only)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random verification clip")
    return p


def parse_shape(text: str) -> tuple[int, ...]:
    """'1,3,16,112,112' or '1x3x16x112x112' -> (1, 3, 16, 112, 112).

    >>> parse_shape("2x3x8")
    (2, 3, 8)
    """
    parts = text.replace("x", ",").replace(" ", "").strip("()[]").split(",")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise InputError(f"--input-shape {text!r} is not a list of integers like 1,3,16,112,112") from None
    if len(shape) < 2 or min(shape) <= 0:
        raise InputError(f"--input-shape {text!r} needs a batch and a time axis, all sizes positive")
    return shape


def _example(args, loaded, shape: tuple | None = None) -> torch.Tensor:
    """The example clip: --input-shape, else the shape the model source (or artifact) carries."""
    if args.input_shape:
        shape = parse_shape(args.input_shape)
    elif loaded.example is not None:
        shape = tuple(loaded.example.shape)
    if shape is None:
        raise InputError(f"{args.model} carries no example input; pass --input-shape N,C,T,... ")
    dtype = loaded.example.dtype if loaded.example is not None and loaded.example.is_floating_point() else torch.float32
    return torch.randn(shape, generator=torch.Generator().manual_seed(args.seed)).to(dtype)


def _compile(args, time_dim: int | None = None, step_frames: int | None = None, shape=None,
             timings: dict | None = None):
    """Load MODEL and compile it; returns (model, example clip, continual model). `timings`, if
    given, receives the seconds cocompile.compile took under "compile"."""
    with phase("loading model"):
        loaded = load_model(args.model, trust_pickle=args.trust_pickle, weights=args.weights)
    clip = _example(args, loaded, shape)
    td = args.time_dim if args.time_dim is not None else (time_dim if time_dim is not None else 2)
    t0 = time.perf_counter()
    with phase("compiling"), _quiet_warnings():
        co = cocompile.compile(loaded.model, clip, time_dim=td, approximate=args.approximate,
                               step_frames=args.step_frames or step_frames)
    if timings is not None:
        timings["compile"] = time.perf_counter() - t0
    return loaded, clip, co


# -- commands --------------------------------------------------------------------------------------
def cmd_compile(args) -> int:
    """Compile, verify E1 on a random clip, write the artifact, check E4, print the summary."""
    from .export import WRITERS, check_artifact

    suffix = os.path.splitext(args.out)[1].lower()
    if suffix not in WRITERS:
        raise InputError(f"--out {args.out}: unknown suffix {suffix or '(none)'!r}; use " + ", ".join(WRITERS))
    if args.triton_repo and suffix != ".onnx":
        raise InputError("--triton-repo serves the ONNX artifact: use --out NAME.onnx")
    loaded, clip, co = _compile(args)
    report = None
    if not args.no_verify:
        with phase("verifying E1"):
            report = cocompile.verify(loaded.model, co, clip)
        if not report.passed:
            print(report)
            print(f"cocompile: verification failed; {args.out} not written", file=sys.stderr)
            return FAILED
    with phase(f"exporting {args.out}"), _quiet_warnings():
        co.export(args.out)
    e4 = None
    if not args.no_verify:
        with phase("checking the artifact (E4)"):
            e4 = check_artifact(co, args.out)
    print(summary(loaded, clip, co, report, e4, args.out))
    if args.triton_repo:
        from .triton import write_repository
        print(f"triton    {write_repository(args.out, args.triton_repo)}")
    return OK if e4 is None or e4.passed else FAILED


def cmd_verify(args) -> int:
    """E1 of MODEL compiled as the artifact was, then E4 of the artifact against it."""
    from .export import check_artifact

    art = load_artifact(args.artifact)
    meta = art.meta
    x = meta["inputs"][0]
    shape = [1, *x["shape"][1:]]
    shape[x["time_axis"]] = meta["clip_length"]
    loaded, clip, co = _compile(args, x["time_axis"], meta["step_frames"], tuple(shape))
    names = [s["name"] for s in meta["states"]]
    if names != [s.name for s in co.specs]:
        print(f"FAILED: {args.artifact} was not compiled from this model with these options "
              f"(states {names[:3]}... vs {[s.name for s in co.specs][:3]}...)")
        return FAILED
    with phase("verifying E1"):
        report = cocompile.verify(loaded.model, co, clip)
    with phase("checking the artifact (E4)"):
        e4 = check_artifact(co, args.artifact)
    print(report)
    print(e4)
    return OK if report.passed and e4.passed else FAILED


def cmd_inspect(args) -> int:
    """Per-layer table of the compiled model."""
    loaded, clip, co = _compile(args)
    print(summary(loaded, clip, co, None, None, None))
    print()
    with phase("counting FLOPs per layer"):
        table = cocompile.inspect(co)
    print(table)
    return OK


def cmd_bench(args) -> int:
    """Latency of one step vs one clip on one thread (and of the ONNX artifact, if given)."""
    torch.set_num_threads(1)
    timings = {}
    loaded, clip, co = _compile(args, timings=timings)
    model = loaded.model.eval()
    chunk = clip.narrow(co.time_dim, 0, co.step_frames)
    with torch.no_grad():
        t0 = time.perf_counter()
        state = [co.step(chunk, co.initial_state(clip.shape[0]))[1]]    # traces the step graph
        t_first = time.perf_counter() - t0
        t_clip = _median_time(lambda: model(clip), max(3, min(20, args.steps // 10)))
        t_step = _median_time(lambda: state.__setitem__(0, co.step(chunk, state[0])[1]), args.steps)
    n = co.clip_length // co.step_frames
    print(f"compile {timings['compile']:.2f} s   first step {t_first:.2f} s (traces the step graph "
          f"for batch {clip.shape[0]}; later steps reuse it)")
    print(f"clip ({co.clip_length} frames): {t_clip * 1e3:.3f} ms   step ({co.step_frames} frames): "
          f"{t_step * 1e3:.3f} ms   (1 thread, batch {clip.shape[0]})")
    print(f"per new output: step {t_step * 1e3:.3f} ms vs re-running the clip {t_clip * 1e3:.3f} ms "
          f"({t_clip / t_step:.1f}x); a whole clip by steps: {n * t_step * 1e3:.3f} ms", flush=True)
    if not args.eager_only:
        print(bench_forms(co, chunk, max(3, args.steps // 2), t_clip, args.artifact), flush=True)
    if args.artifact:
        print(bench_runtime(args.artifact, args.steps))
    return OK


def bench_forms(co, chunk: torch.Tensor, rounds: int, t_clip: float, onnx_path=None) -> str:
    """The eager step, the TorchScript artifact and the ONNX artifact in onnxruntime side by side:
    each steps its own stream; every round calls each once, in turn (so the machine's drift hits
    all alike), after 3 untimed calls; medians over `rounds`. The artifacts are written to a
    temporary folder (`onnx_path`, if given, is timed instead of a fresh ONNX export)."""
    import tempfile

    from cocompile.runtime import Session

    n = len(co.out_infos)
    with tempfile.TemporaryDirectory() as tmp, _quiet_warnings():
        with phase("exporting the step to TorchScript and ONNX to time them"):
            script = load_artifact(co.export(os.path.join(tmp, "step.pt"))).run
            sess = Session(onnx_path or co.export(os.path.join(tmp, "step.onnx")), threads=1)
        x, batch = chunk.contiguous().numpy(), chunk.shape[0]
        calls = {"eager": _stepper(lambda s: co.step(chunk, s)[1], co.initial_state(batch)),
                 "TorchScript": _stepper(lambda s: script(chunk, *s)[n:], co.initial_state(batch)),
                 "onnxruntime": _stepper(lambda s: sess.step(x, s)[1], sess.initial_state(batch))}
        with torch.no_grad():
            ms = {k: v * 1e3 for k, v in _interleaved(calls, rounds).items()}
    times = "   ".join(f"{k} {v:.3f} ms ({t_clip * 1e3 / v:.1f}x)" for k, v in ms.items())
    return (f"step, median of {rounds} interleaved rounds (x: clip / step): {times}; "
            f"onnxruntime / eager {ms['onnxruntime'] / ms['eager']:.2f}, "
            f"TorchScript / eager {ms['TorchScript'] / ms['eager']:.2f}")


def bench_runtime(path: str, steps: int) -> str:
    """onnxruntime step latency over a stream of `steps` steps from the zero state, one stream, one
    thread (after 200 untimed warm-up steps). Reports the medians of the first and the last
    thousand (or tenth) steps, measured twice: in sequence, and interleaved (a fresh stream and
    the stream at its end step in turn), which cancels the machine's own drift in speed."""
    import numpy as np

    from cocompile.runtime import Session

    sess = Session(path, threads=1)
    x = np.random.default_rng(0).standard_normal((1, *sess.chunk_shape)).astype(sess.dtype)

    def timed(state):
        t0 = time.perf_counter()
        _, state = sess.step(x, state)
        return time.perf_counter() - t0, state

    state = sess.initial_state(1)
    for _ in range(200):
        _, state = timed(state)
    k = max(1, min(1000, steps // 10))
    late, times = sess.initial_state(1), []
    for _ in range(steps - k):
        dt, late = timed(late)
        times.append(dt)
    early, pairs = sess.initial_state(1), []
    for _ in range(k):
        dt_early, early = timed(early)
        dt_late, late = timed(late)
        times.append(dt_late)
        pairs.append((dt_early, dt_late))
    first, last = float(np.median(times[:k])), float(np.median(times[-k:]))
    e, lt = (float(np.median([p[i] for p in pairs])) for i in (0, 1))
    name = os.path.basename(path)
    return (f"onnxruntime {name}: {steps} steps; in sequence: median of steps 1-{k} {first * 1e3:.3f} ms, "
            f"of steps {steps - k + 1}-{steps} {last * 1e3:.3f} ms ({(last / first - 1) * 100:+.1f}%); "
            f"interleaved: {e * 1e3:.3f} ms vs {lt * 1e3:.3f} ms ({(lt / e - 1) * 100:+.1f}%)")


# -- summary ---------------------------------------------------------------------------------------
def summary(loaded, clip, co, report, e4, out) -> str:
    """The one-screen summary of a compiled model."""
    step_flops, clip_flops = flops(co, loaded.model, clip)
    state_bytes = sum(math.prod(s.shape) * s.dtype.itemsize for s in co.specs)
    exact = ("approximate (causal window for a non-causal clip reduction)" if co.approximate else
             "exact (E1)" + ("" if co.exact_sliding else "; sliding windows deviate (temporal zero padding)"))
    lines = [f"model     {loaded.source}",
             f"input     {tuple(clip.shape)} {str(clip.dtype).removeprefix('torch.')}, time axis "
             f"{co.time_dim}, clip {co.clip_length} frames, step {co.step_frames} frame(s)",
             f"delay     {co.delay} frames    receptive field {co.receptive_field} frames",
             f"state     {len(co.specs)} tensors, {_bytes(state_bytes)} per stream",
             f"FLOPs     {_num(step_flops)} per step vs {_num(clip_flops)} per clip "
             f"({step_flops / max(clip_flops, 1) * co.clip_length / co.step_frames:.2f}x the clip's share)",
             f"exactness {exact}"]
    for name, info in zip(_output_names(co), co.out_infos):
        lines.append(f"  {name:<6} {info.kind:<6} " + _validity(info, co.step_frames))
    if report is not None:
        lines.append(f"verify    E1 max |err| {report.max_error('E1'):.3g}  "
                     f"{'PASSED' if report.passed else 'FAILED'}")
    if out:
        lines.append(f"artifact  {out} ({_bytes(os.path.getsize(out))})" + (f"\n          {e4}" if e4 else ""))
    return "\n".join(lines)


def _validity(info, c: int) -> str:
    if info.kind == "time":
        return f"warm-up {info.warmup} frame(s), delay {info.lag()} input frames"
    if info.kind in ("clip", "window"):
        return f"valid after {info.ready} input frames ({-(-info.ready // c)} steps)"
    return "always valid"


def _output_names(co) -> list[str]:
    from .metadata import output_names
    return output_names(co)


def flops(co, model, clip) -> tuple[int, int]:
    """FLOPs of one step (batch of the clip) and of model(clip), counted by FlopCounterMode."""
    chunk = clip.narrow(co.time_dim, 0, co.step_frames)
    with torch.no_grad(), FlopCounterMode(display=False) as step:
        co.program(chunk, *co.initial_state(clip.shape[0]))
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)   # fused encoder kernels are not counted
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as whole:
            model(clip)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    return step.get_total_flops(), whole.get_total_flops()


# -- helpers ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def phase(name: str, after: float = 2.0):
    """Say on stderr what is happening when it takes longer than `after` seconds."""
    t0 = time.perf_counter()
    timer = threading.Timer(after, lambda: print(f"cocompile: {name} ...", file=sys.stderr, flush=True))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        if time.perf_counter() - t0 > after:
            print(f"cocompile: {name} done in {time.perf_counter() - t0:.1f}s", file=sys.stderr)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """Warnings as one line each, without the source line of cocompile's internals."""
    print(f"cocompile: warning: {str(message).strip().splitlines()[0]}", file=sys.stderr)


@contextlib.contextmanager
def _quiet_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def _stepper(step, state):
    """A call that runs `state = step(state)`: one stream stepping on its own state."""
    box = [state]

    def call():
        box[0] = step(box[0])
    return call


def _interleaved(calls: dict, rounds: int, warmup: int = 3) -> dict:
    """{name: median seconds}: each round calls every fn once, in turn, after `warmup` untimed rounds."""
    times = {k: [] for k in calls}
    for i in range(warmup + rounds):
        for k, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            if i >= warmup:
                times[k].append(time.perf_counter() - t0)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def _median_time(fn, n: int) -> float:
    fn()                                      # warm-up
    times = []
    for _ in range(max(n, 1)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _num(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f}"


if __name__ == "__main__":
    sys.exit(main())
