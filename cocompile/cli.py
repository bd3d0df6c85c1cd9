"""The `cocompile` command (docs/design.md, "CLI"). Exit codes: 0 ok, 1 verification failed,
2 usage/input error.

    cocompile MODEL --out co_model.onnx [--input-shape 1,3,16,112,112] [--time-dim 2] [--batch-dim 0]
                                        [--step-frames C]
                                        [--approximate] [--no-verify] [--trust-pickle] [--weights FILE]
                                        [--quantize int8 [--calibration N|CLIPS.pt]]
    cocompile inspect MODEL             per-layer table: window, lag, receptive field, state, FLOPs
    cocompile verify MODEL ARTIFACT     E1 of the model's compilation, E4 of the artifact
    cocompile bench MODEL               step vs clip latency on one thread, each step form against
                                        the clip in the same runtime: eager, TorchScript and
                                        onnxruntime (--eager-only: eager alone)

MODEL: a torch.export archive, `pkg.module:factory`, or (with --trust-pickle) a pickled module.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import difflib
import inspect
import math
import os
import re
import sys
import threading
import time
import warnings

import torch
from torch.utils.flop_counter import FlopCounterMode

import cocompile

from . import bench
from .errors import CompileError, first_line
from .loading import InputError, load_artifact, load_model

COMMANDS = ("inspect", "verify", "bench")
OK, FAILED, USAGE = 0, 1, 2


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `cocompile` script; returns (and exits with) the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv and argv[0] in COMMANDS else "compile"
    if command == "compile" and argv and _unknown_command(argv[0]):
        close = difflib.get_close_matches(argv[0], COMMANDS, n=1)
        print(f"cocompile: error: unknown subcommand {argv[0]!r}"
              + (f" (did you mean {close[0]!r}?)" if close else "")
              + f"; the subcommands are {', '.join(COMMANDS)}, and `cocompile MODEL --out FILE` "
              "compiles MODEL", file=sys.stderr)
        return USAGE
    try:
        args = _parser(command).parse_args(argv[1:] if command != "compile" else argv)
    except SystemExit as exit_:               # argparse already printed the usage and the reason
        return USAGE if exit_.code else OK
    warnings.showwarning = _show_warning
    try:
        code = {"compile": cmd_compile, "inspect": cmd_inspect, "verify": cmd_verify,
                "bench": cmd_bench}[command](args)
    except InputError as err:
        print(f"cocompile: error: {err}", file=sys.stderr)
        code = USAGE
    except CompileError as err:
        print(f"cocompile: error: {cli_spelling(err)}", file=sys.stderr)
        code = USAGE
    return code


def _unknown_command(word: str) -> bool:
    """A first argument that can be neither a subcommand nor a MODEL: no option, no existing
    path, and not a pkg.module:factory (those have a ':'; files have a '.' or a '/')."""
    return not word.startswith("-") and not any(c in word for c in ":./\\") and not os.path.exists(word)


# The Python keywords that CompileError messages name, and the options that set the same thing
# on the command line (the rules speak to compile()'s callers; the CLI's users type options).
CLI_SPELLING = (
    (re.compile(r"\bapproximate=True\b"), "--approximate"),
    (re.compile(r"\bcompile\(\.\.\., verify=False\)"), "`cocompile MODEL --out FILE --no-verify`"),
    (re.compile(r"\bverify=False\b"), "--no-verify"),
    (re.compile(r"\btime_dim=(-?\d+)"), r"--time-dim \1"),
    (re.compile(r"\btime_dim=?"), "--time-dim"),
    (re.compile(r"\bbatch_dim=(-?\d+)"), r"--batch-dim \1"),
    (re.compile(r"\bbatch_dim=?"), "--batch-dim"),
    (re.compile(r"\bstep_frames=(\d+)"), r"--step-frames \1"),
    (re.compile(r"\bstep_frames\b"), "--step-frames"),
)


def cli_spelling(err: CompileError) -> str:
    """The error's message with its reason and fix in the CLI's spelling (the user's source line,
    also part of the message, stays as written).

    >>> cli_spelling(CompileError("x", hint="compile with approximate=True"))
    'x\\n  fix:    compile with --approximate'
    """
    def spell(text):
        for pattern, option in CLI_SPELLING:
            text = pattern.sub(option, text) if text else text
        return text
    return str(CompileError(spell(err.reason), op=err.op, module=err.module, source=err.source,
                            hint=spell(err.hint)))


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
        p.add_argument("--quantize", choices=("int8",),
                       help="write a statically quantized ONNX step (approximate; needs --out *.onnx)")
        p.add_argument("--calibration", metavar="N|CLIPS.pt", default="8",
                       help="--quantize calibration: N random clips (default 8), or a file of clips "
                            "(a tensor, one clip per batch entry, or a list of clips; weights-only)")
    if command == "bench":
        p.add_argument("--steps", type=_positive, default=200,
                       help="steps to time per runtime (default 200)")
        p.add_argument("--artifact", help="time this ONNX artifact as the onnxruntime step (instead "
                       "of a fresh export), and its latency along a stream of --steps steps")
        p.add_argument("--eager-only", action="store_true",
                       help="time the eager step and clip only (no TorchScript, no onnxruntime)")
        p.add_argument("--dtype", choices=("float32", "float16", "bfloat16", "int8"), default="float32",
                       help="time the step and the clip in this dtype (int8: onnxruntime, quantized "
                            "on --calibration clips), each also against the float32 step")
        p.add_argument("--calibration", metavar="N|CLIPS.pt", default="8",
                       help="--dtype int8: N random clips (default 8) or a file of clips")
        p.add_argument("--streams", type=_counts, metavar="N[,N...]",
                       help="step N independent streams in one batched call (e.g. 1,4,16,64): frames "
                            "per second per core and the streams one core sustains at --fps, against "
                            "re-running a clip per stream")
        p.add_argument("--fps", type=float, default=30.0,
                       help="--streams: frames per second of each stream (default 30)")
    p.add_argument("--input-shape", action="append",
                   help="example input shape in the model's layout, e.g. 1,3,16,112,112 (the "
                        "batch on --batch-dim); once per model input for a model of several inputs "
                        "(passed as positional arguments)")
    p.add_argument("--time-dim", type=parse_time_dim, default=None,
                   help="axis of the frames (default 2); for several inputs one per input, "
                        "'none' for an input without time, e.g. 2,none")
    p.add_argument("--batch-dim", type=parse_batch_dim, default=None,
                   help="axis of the streams (default 0), e.g. 1 with --time-dim 0 for time-major "
                        "(T, N, F) inputs; for several inputs one per input, e.g. 1,0. Chunks, "
                        "outputs and the artifact keep this layout")
    p.add_argument("--step-frames", type=int, default=None, help="frames per step (default: smallest)")
    p.add_argument("--approximate", action="store_true", help="allow causal approximations")
    p.add_argument("--trust-pickle", action="store_true", help="allow loading a pickled module (runs its code)")
    p.add_argument("--weights", help="state dict for a pkg.module:factory MODEL (loaded weights-only)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random verification clip")
    return p


def _positive(text: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number of steps")
    return value


def _counts(text: str) -> tuple[int, ...]:
    """argparse type: '16' or '1,4,16,64' -> positive stream counts."""
    try:
        counts = tuple(int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of streams like 16 or 1,4,16,64") from None
    if min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every number of streams must be at least 1")
    return counts


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


def parse_time_dim(text: str):
    """'2' -> 2; '2,none' -> (2, None): one axis for every input, or one per input.

    >>> parse_time_dim("2,none")
    (2, None)
    """
    parts = [p.strip().lower() for p in text.split(",")]
    try:
        dims = tuple(None if p in ("none", "-") else int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an axis or a list of axes like 2,none") from None
    return dims[0] if len(dims) == 1 else dims


def parse_batch_dim(text: str):
    """'1' -> 1; '1,0' -> (1, 0): one batch axis for every input, or one per input (side inputs
    have one too).

    >>> parse_batch_dim("1,0")
    (1, 0)
    """
    try:
        dims = tuple(int(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an axis or a list of axes like 1,0 "
                                         "(every input has a batch axis)") from None
    return dims[0] if len(dims) == 1 else dims


def _example(args, loaded, shape: tuple | None = None):
    """The example clip: --input-shape (a tensor, or a tuple of them given several), else random
    inputs of the shapes the model source (or artifact) carries; side inputs that are not floating
    point keep the source's values."""
    g = torch.Generator().manual_seed(args.seed)
    if args.input_shape:
        shapes = [parse_shape(text) for text in args.input_shape]
        clips = tuple(torch.randn(s, generator=g) for s in shapes)
        if len(clips) == 1:
            return clips[0]
        # a forward() of one argument takes its inputs as one list ([slow, fast])
        return list(clips) if _positional_params(loaded.model) == 1 else clips
    if loaded.example is not None:
        return torch.utils._pytree.tree_map(
            lambda t: torch.randn(t.shape, generator=g).to(t.dtype) if t.is_floating_point() else t.clone(),
            loaded.example)
    if shape is None:
        raise InputError(f"{args.model} carries no example input; pass --input-shape N,C,T,... ")
    return torch.randn(shape, generator=g)


def _positional_params(model) -> int | None:
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError, AttributeError):
        return None
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return None
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)


def _compile(args, time_dim: int | None = None, step_frames: int | None = None, shape=None,
             timings: dict | None = None, verify: bool = True, batch_dim=None):
    """Load MODEL and compile it; returns (model, example clip, continual model). `timings`, if
    given, receives the seconds cocompile.compile took under "compile"; `verify=False` where the
    command checks E1 itself (and reports a failure with exit code 1)."""
    with phase("loading model"):
        loaded = load_model(args.model, trust_pickle=args.trust_pickle, weights=args.weights)
    clip = _example(args, loaded, shape)
    td = next(d for d in (args.time_dim, time_dim, loaded.time_dim, 2) if d is not None)
    bd = next(d for d in (args.batch_dim, batch_dim, loaded.batch_dim, 0) if d is not None)
    t0 = time.perf_counter()
    try:
        with phase("compiling"), _quiet_warnings():
            co = cocompile.compile(loaded.model, clip, time_dim=td, batch_dim=bd, approximate=args.approximate,
                                   step_frames=args.step_frames or step_frames, verify=verify)
    except CompileError as err:
        if err.op is not None:                        # an op rule refused: the example ran
            raise
        raise (_example_mismatch(args, loaded.model, clip, shape) or err) from None
    if timings is not None:
        timings["compile"] = time.perf_counter() - t0
    return loaded, clip, co


def _example_mismatch(args, model, clip, shape) -> InputError | None:
    """An error naming the example's shape when the model cannot even run on it (wrong channels,
    too few frames, ...), which is why torch.export failed; None if the model runs on it."""
    args_ = clip if isinstance(clip, tuple) else (clip,)
    try:
        with torch.no_grad(), _quiet_warnings():
            model(*args_)
        return None
    except Exception as err:  # noqa: BLE001 - any failure of the user's forward() on this input
        reason = first_line(err)
    origin = ("from --input-shape" if args.input_shape else
              "from the artifact's metadata" if shape is not None else f"that {args.model} carries")
    return InputError(f"the model does not run on the example input of shape {_shapes(clip)} "
                      f"{origin}: {reason}; --input-shape sets the example's shape (batch first, "
                      "e.g. the channels the model's first layer expects, the batch on --batch-dim)")


# -- commands --------------------------------------------------------------------------------------
def cmd_compile(args) -> int:
    """Compile, verify E1 on a random clip, write the artifact, check E4, print the summary."""
    from .export import WRITERS, check_artifact

    suffix = os.path.splitext(args.out)[1].lower()
    if suffix not in WRITERS:
        raise InputError(f"--out {args.out}: unknown suffix {suffix or '(none)'!r}; use " + ", ".join(WRITERS))
    if args.triton_repo and suffix != ".onnx":
        raise InputError("--triton-repo serves the ONNX artifact: use --out NAME.onnx")
    if args.quantize and suffix != ".onnx":
        raise InputError(f"--quantize {args.quantize} writes an ONNX step: use --out NAME.onnx")
    loaded, clip, co = _compile(args, verify=False)
    report = None
    if not args.no_verify:
        with phase("verifying E1"):
            report = cocompile.verify(loaded.model, co, clip)
        if not report.passed:
            print(report)
            print(f"cocompile: verification failed; {args.out} not written", file=sys.stderr)
            return FAILED
    calibration = _calibration(args.calibration) if args.quantize else None
    with phase(f"exporting {args.out}"), _quiet_warnings():
        co.export(args.out, quantize=args.quantize, calibration=calibration)
    e4 = None
    if not args.no_verify and not args.quantize:       # an int8 step is approximate, not E4-exact
        with phase("checking the artifact (E4)"):
            e4 = check_artifact(co, args.out)
    print(summary(loaded, clip, co, report, e4, args.out))
    if args.quantize:
        q = load_artifact(args.out).meta["quantization"]
        print(f"{args.quantize:<10}approximate: deviation from the float step {q['deviation']:.3g} "
              f"(max over {q['deviation_steps']} steps, relative to max(1, max|output|))")
    if args.triton_repo:
        from .triton import write_repository
        print(f"triton    {write_repository(args.out, args.triton_repo)}")
    return OK if e4 is None or e4.passed else FAILED


def _calibration(text: str):
    """--calibration: a number of random clips, or the clips in a tensor file (weights-only)."""
    if text.isdigit():
        return int(text)
    try:
        clips = torch.load(text, weights_only=True)
    except Exception as err:  # noqa: BLE001 - missing file, not a tensor file, unsafe content
        raise InputError(f"--calibration {text}: not a number of clips nor a readable tensor file "
                         f"({str(err).strip().splitlines()[0]})") from None
    if isinstance(clips, torch.Tensor):
        return list(clips.split(1))                   # one clip per batch entry
    if isinstance(clips, (list, tuple)) and clips:
        return list(clips)
    raise InputError(f"--calibration {text}: holds {type(clips).__name__}, not clips; save a tensor "
                     "(clips along the batch axis) or a list of clips")


def cmd_verify(args) -> int:
    """E1 of MODEL compiled as the artifact was, then E4 of the artifact against it."""
    from .export import check_artifact

    art = load_artifact(args.artifact)
    meta = art.meta
    x = meta["inputs"][0]
    shape = list(x["shape"])
    shape[x.get("batch_axis", 0)] = 1
    shape[x["time_axis"]] = meta["clip_length"]
    dims, batches = ([i[key] for i in meta["inputs"]] for key in ("time_axis", "batch_axis"))
    dims, batches = (d[0] if len(d) == 1 else torch.utils._pytree.tree_unflatten(
        d, torch.utils._pytree.treespec_loads(meta["input_structure"])) for d in (dims, batches))
    loaded, clip, co = _compile(args, dims, meta["step_frames"], tuple(shape), verify=False,
                                batch_dim=batches)
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
    """Each step form against the clip in the same runtime, one thread (see cocompile.bench)."""
    import tempfile

    torch.set_num_threads(1)
    if args.dtype != "float32":
        return cmd_bench_dtype(args)
    if args.streams:
        return cmd_bench_streams(args)
    timings = {}
    loaded, clip, co = _compile(args, timings=timings)
    model = loaded.model.eval()
    chunks = bench.chunks_of(co, clip)
    with torch.no_grad():
        t0 = time.perf_counter()
        co.step(chunks[0], co.initial_state(bench.batch_of(clip, co)))   # traces the step graph
        t_first = time.perf_counter() - t0
    print(f"compile {timings['compile']:.2f} s   first step {t_first:.2f} s (traces the step graph "
          f"for batch {bench.batch_of(clip, co)}; later steps reuse it)", flush=True)
    runtimes = [bench.RUNTIMES["eager"]] if args.eager_only else list(bench.RUNTIMES.values())
    rounds, stream = _rounds(args.steps)
    given = {"onnxruntime": args.artifact} if args.artifact else None
    with phase("measuring this machine's peak FLOP/s and bandwidth, and the step's roofline"):
        bound = bench.roofline(co, bench.measure_machine(), bench.batch_of(clip, co))
    print(bound, flush=True)
    with tempfile.TemporaryDirectory() as tmp, _quiet_warnings(), phase("timing clip and step"):
        latency = bench.measure(model, clip, co, chunks, rounds, stream, tmp, runtimes, given)
    print(bench_table(co, clip, latency, rounds, stream, bound), flush=True)
    if args.artifact:
        print(bench.stream_drift(args.artifact, args.steps))
    return OK


def _rounds(steps: int) -> tuple[int, int]:
    """(interleaved rounds, steps in a row per round) that time about `steps` steps per runtime."""
    rounds = min(20, max(3, steps // 10))
    return rounds, -(-steps // rounds)


def cmd_bench_dtype(args) -> int:
    """bench --dtype: the model and clip converted to the dtype (int8: the ONNX step quantized,
    and the offline model quantized alike), each step form against the clip in that dtype and
    runtime, and against the float32 step of the same runtime, all timed interleaved."""
    import tempfile

    loaded, clip, co = _compile(args)
    rounds, stream = _rounds(args.steps)
    with tempfile.TemporaryDirectory() as tmp, _quiet_warnings(), phase("timing clip and step"):
        low = _in_dtype(args, loaded.model.eval(), clip, co, tmp)
        fns, why = bench.calls(*low[:3], bench.chunks_of(low[2], low[1]), low[3], stream, tmp, low[4])
        steps_only = [dataclasses.replace(rt, clip=_no_clip) for rt in _float32_twins(args, low[3])]
        os.makedirs(os.path.join(tmp, "float32"))
        ref, _ = bench.calls(loaded.model.eval(), clip, co, bench.chunks_of(co, clip), steps_only,
                             stream, os.path.join(tmp, "float32"))
        with torch.no_grad():
            seconds = bench.interleaved({**fns, **{f"{k} float32": v for k, v in ref.items()}}, rounds)
    print(bench_dtype_table(args.dtype, co, clip, low[3], seconds, why, rounds, stream), flush=True)
    return OK


def _in_dtype(args, model, clip, co, folder):
    """(model, clip, continual model, runtimes, written artifacts) in args.dtype; a runtime whose
    step cannot be written in that dtype is left out, saying why."""
    if args.dtype == "int8":
        clips = _calibration(args.calibration)
        path = os.path.join(folder, "step_int8.onnx")
        with phase("quantizing the step"):
            co.export(path, quantize="int8", calibration=clips)
        clips = _clip_list(co, clips)
        runtime = bench.Runtime("onnxruntime int8", ".onnx", _int8_clip(clips),
                                bench.RUNTIMES["onnxruntime"].step)
        return model, clip, co, [runtime], {runtime.name: path}
    dtype = getattr(torch, args.dtype)
    model = copy.deepcopy(model).to(dtype)
    clip = torch.utils._pytree.tree_map(lambda t: t.to(dtype) if t.is_floating_point() else t, clip)
    single = co.inputs.single
    low = cocompile.compile(model, clip, time_dim=co.time_dim if single else
                            co.inputs.unflatten([s.time_dim for s in co.inputs.specs]),
                            batch_dim=co.batch_dim if single else
                            co.inputs.unflatten([s.batch_dim for s in co.inputs.specs]),
                            approximate=args.approximate, step_frames=co.step_frames)
    runtimes, written = [], {}
    for rt in ([bench.RUNTIMES["eager"]] if args.eager_only else bench.RUNTIMES.values()):
        try:
            if rt.suffix:
                written[rt.name] = low.export(os.path.join(folder, f"step_{args.dtype}{rt.suffix}"))
            runtimes.append(rt)
        except CompileError as err:
            print(f"{rt.name}: no {args.dtype} step ({err.reason})", flush=True)
    return model, clip, low, runtimes, written


def _float32_twins(args, runtimes) -> list:
    """The float32 runtimes the dtype's steps are compared with (int8: onnxruntime float32)."""
    return [bench.RUNTIMES[_float32_twins_name(args.dtype, rt.name)] for rt in runtimes]


def _no_clip(*args):
    raise bench.Unavailable("not timed")


def _clip_list(co, clips) -> list:
    """Calibration clips as a list (N random clips of the compiled length for an int N)."""
    if not isinstance(clips, int):
        return clips
    from .quantize import random_clip
    g = torch.Generator().manual_seed(0)
    return [co.inputs.unflatten(random_clip(co, g)) for _ in range(clips)]


def _int8_clip(clips):
    """bench clip function: the offline model quantized on the same clips, in onnxruntime."""
    def clip_fn(model, clip, folder, threads, co):
        import onnxruntime as ort

        from .quantize import quantize_clip
        path = quantize_clip(model, co, clip, os.path.join(folder, "clip_int8.onnx"), clips)
        sess = ort.InferenceSession(path, bench.onnx_options(threads), providers=["CPUExecutionProvider"])
        feed = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), co.inputs.leaves(clip))}
        return lambda: sess.run(None, feed)
    return clip_fn


def bench_dtype_table(dtype: str, co, clip, runtimes, seconds: dict, why: dict, rounds, stream) -> str:
    """Per runtime: clip and step in the dtype, their ratio, and the float32 step beside."""
    ideal = co.clip_length / co.step_frames
    lines = [f"{dtype}: clip {plural(co.clip_length, 'frame')}, step {plural(co.step_frames, 'frame')} "
             f"(ideal speedup {ideal:g}x); 1 thread, batch {bench.batch_of(clip, co)}; each {dtype} step "
             f"against the {dtype} clip in the same runtime, and against that runtime's float32 step; "
             f"medians of {plural(rounds, 'interleaved round')} ({plural(stream, 'step')} in a row)",
             f"{'runtime':<18}{'clip ms':>10}{'step ms':>10}  {'clip / step (of ideal)':<24}"
             f"{'float32 step ms':>16}{'float32 / step':>16}"]
    for rt in runtimes:
        lat = bench.Latency(rt.name, seconds.get(f"{rt.name} clip"), seconds[f"{rt.name} step"],
                            why.get(rt.name, ""))
        ref = seconds[f"{_float32_twins_name(dtype, rt.name)} step float32"]
        lines.append(f"{rt.name:<18}{bench.ms_cell(lat.clip):>10}{bench.ms_cell(lat.step):>10}  "
                     f"{bench.ratio_cell(lat, ideal):<24}{bench.ms_cell(ref):>16}"
                     f"{ref / lat.step:>15.2f}x")
    return "\n".join(lines)


def _float32_twins_name(dtype: str, name: str) -> str:
    return "onnxruntime" if dtype == "int8" else name


def cmd_bench_streams(args) -> int:
    """bench --streams: per runtime, one batched step of N streams for each N against re-running
    a clip per stream, timed interleaved (cocompile.bench.measure_streams)."""
    import tempfile

    loaded, clip, co = _compile(args)
    runtimes = [bench.RUNTIMES["eager"]] if args.eager_only else \
        [bench.RUNTIMES[n] for n in ("eager", "onnxruntime")]
    rounds, _ = _rounds(args.steps)
    with tempfile.TemporaryDirectory() as tmp, _quiet_warnings(), phase("timing batched steps"):
        rows = bench.measure_streams(loaded.model.eval(), clip, co, args.streams, rounds, tmp, runtimes)
    print(f"{plural(co.step_frames, 'frame')} per stream and call, 1 thread (one core); medians of "
          f"{plural(rounds, 'interleaved round')}; a clip per stream: the offline model on one "
          f"stream's {plural(co.clip_length, 'frame')} clip for every stream and step")
    print(bench.streams_table(rows, args.fps), flush=True)
    return OK


def bench_table(co, clip, latency: dict, rounds: int, stream: int, bound=None) -> str:
    """The step against the clip per runtime, one line each; with the step's roofline `bound`
    (cocompile.bench.Roofline), each step's time over it."""
    ideal = co.clip_length / co.step_frames
    lines = [f"clip {plural(co.clip_length, 'frame')}, step {plural(co.step_frames, 'frame')} "
             f"(ideal speedup {ideal:g}x); 1 thread, batch {bench.batch_of(clip, co)}; each step against the "
             f"clip in the same runtime, medians of {plural(rounds, 'interleaved round')} (each: "
             f"the clip once, then {plural(stream, 'step')} in a row)",
             f"{'runtime':<14}{'clip ms':>12}{'step ms':>12}  {'clip / step (of ideal)':<24}step / roofline"]
    for lat in latency.values():
        lines.append(f"{lat.runtime:<14}{bench.ms_cell(lat.clip):>12}{bench.ms_cell(lat.step):>12}  "
                     f"{bench.ratio_cell(lat, ideal):<24}{bench.bound_cell(bound, lat.step)}")
    return "\n".join(lines)


# -- summary ---------------------------------------------------------------------------------------
def summary(loaded, clip, co, report, e4, out) -> str:
    """The one-screen summary of a compiled model."""
    step_flops, clip_flops = flops(co, loaded.model, clip)
    state_bytes = sum(math.prod(s.shape) * s.dtype.itemsize for s in co.specs)
    recurrent = any(i.recurrent for i in co.out_infos)
    why = "a recurrent layer carries the whole stream" if recurrent else "temporal zero padding"
    exact = ("approximate (causal window for a clip reduction or a norm over time)" if co.approximate else
             "exact (E1)" + ("" if co.exact_sliding else f"; sliding windows deviate ({why})"))
    rf = "unbounded" if co.receptive_field == math.inf else plural(co.receptive_field, "frame")
    lines = [f"model     {loaded.source}",
             f"input     {_inputs(co, clip)}, clip {plural(co.clip_length, 'frame')}, "
             f"step {plural(co.step_frames, 'frame')}",
             f"delay     {plural(co.delay, 'frame')}    receptive field {rf}",
             f"state     {plural(len(co.specs), 'tensor')}, {_bytes(state_bytes)} per stream",
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


def _shapes(clip) -> str:
    shapes = [tuple(t.shape) for t in torch.utils._pytree.tree_leaves(clip)]
    return str(shapes[0]) if len(shapes) == 1 else " ".join(map(str, shapes))


def _inputs(co, clip) -> str:
    """`(1, 8, 32) float32, time axis 2`; per input for several (name, shape, rate or `side`)."""
    leaves = co.inputs.leaves(clip)
    if co.inputs.single:
        return (f"{tuple(leaves[0].shape)} {str(leaves[0].dtype).removeprefix('torch.')}, time axis "
                f"{co.time_dim}" + (f", batch axis {co.batch_dim}" if co.batch_dim else ""))
    return "; ".join(f"{s.name} {tuple(t.shape)} " + (f"time axis {s.time_dim} at rate {s.rate}"
                                                     if s.is_time else "side input")
                     + (f", batch axis {s.batch_dim}" if s.batch_dim else "")
                     for s, t in zip(co.inputs.specs, leaves))


def _validity(info, c: int) -> str:
    if info.kind == "time":
        return f"warm-up {plural(info.warmup, 'frame')}, delay {plural(info.lag(), 'input frame')}"
    if info.kind in ("clip", "window"):
        return f"valid after {plural(info.ready, 'input frame')} ({plural(-(-info.ready // c), 'step')})"
    return "always valid"


def _output_names(co) -> list[str]:
    from .metadata import output_names
    return output_names(co)


def flops(co, model, clip) -> tuple[int, int]:
    """FLOPs of one step (batch of the clip) and of model(clip), counted by FlopCounterMode."""
    leaves = co.inputs.leaves(clip)
    chunk = co.inputs.window(leaves, 0, co.step_frames)
    with torch.no_grad(), FlopCounterMode(display=False) as step:
        co.program(*chunk, *co.initial_state(co.inputs.batch_size(leaves)))
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)   # fused encoder kernels are not counted
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as whole:
            model(*co.inputs.args(clip))
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


def plural(n, word: str) -> str:
    """`1 frame`, `2 frames`; an unbounded count (math.inf, behind a recurrent layer) is said so.

    >>> plural(1, "frame"), plural(0, "step"), plural(3, "input frame")
    ('1 frame', '0 steps', '3 input frames')
    """
    if n == math.inf:
        return f"unbounded ({word}s)"
    return f"{n} {word}" + ("" if n == 1 else "s")


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
