"""Step latency against re-running the clip, each step form against the clip run the same way.

A runtime is one way of running a model. Its step (the continual model) is compared with the
offline model's clip in that same runtime, never with another runtime's clip, so that a speedup
says what streaming saves and not what the runtime adds:

    runtime       clip: the offline model                           step: the continual model
    eager         model(clip)                                       co.step(chunk, state)
    TorchScript   torch.jit.trace(model, clip), saved and loaded    co.export("step.pt"), loaded
    onnxruntime   torch.onnx.export(model, clip, dynamo=True) in    co.export("step.onnx") in
                  onnxruntime, with the step session's options      cocompile.runtime.Session
    compiled      torch.compile(model) with freezing, static        co.compiled(): the traced step
                  shapes (cocompile.aoti.compiled_clip)             compiled the same way
    AOTInductor   the model exported and compiled into a package    co.export("step.aoti.pt2"), both
                  (Inductor defaults, freezing)                     called through the package loader

A runtime is one `Runtime` entry in RUNTIMES; the tables of `cocompile bench` and
examples/speed.py take their columns from it. Where the offline model does not export to a
runtime, `Latency.why` says why and the clip has no latency there.

Timing is interleaved: every round runs each runtime's clip once and then its step for a stream
of steps in a row (as a live stream calls it; a step's time is the mean over its stream), after a
few untimed calls, and the median over rounds is kept, so that a shared machine's drift hits every
column alike.

>>> lat = measure(model, clip, co, chunks_of(co, clip), rounds=5, stream=4, folder=tmp)
>>> lat["onnxruntime"].speedup, lat["onnxruntime"].share(co.clip_length / co.step_frames)
"""
from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .errors import first_line

WARMUP = 3          # untimed calls of everything before the timed rounds


class Unavailable(Exception):
    """This runtime cannot run the offline model (its export failed); the message says why."""


@dataclass(frozen=True)
class StepForm:
    """How a runtime steps: `call(x, state) -> next state`, its zero state for a batch, and the
    conversion of a torch chunk into what `call` takes."""

    call: Callable
    initial_state: Callable
    convert: Callable = lambda x: x


@dataclass(frozen=True)
class Runtime:
    """One column of the speed tables: how to run the offline clip and the step in one runtime.

    suffix   the artifact the step is written to (None: the step runs in this process as is)
    clip     (model, clip, folder, threads, co) -> a call running model(clip) once (the clip in
             the model's input structure); raises Unavailable
    step     (co, artifact path or None, threads) -> StepForm
    """

    name: str
    suffix: str | None
    clip: Callable
    step: Callable


@dataclass
class Latency:
    """Median seconds of one clip and of one step in one runtime; `why` names what is missing."""

    runtime: str
    clip: float | None
    step: float | None
    why: str = ""

    @property
    def speedup(self) -> float | None:
        """Clip latency over step latency: how much cheaper one new prediction is by stepping."""
        return self.clip / self.step if self.clip and self.step else None

    def share(self, ideal: float) -> float | None:
        """The speedup as a share of `ideal` (T / step_frames: a step that costs exactly its
        frames' share of the clip)."""
        return None if self.speedup is None else self.speedup / ideal


# -- the runtimes ----------------------------------------------------------------------------------
def _args(co, clip) -> tuple:
    """model(*args) for a clip in the model's input structure."""
    return tuple(co.inputs.args(clip))


def _eager_clip(model, clip, folder, threads, co):
    args = _args(co, clip)
    return lambda: model(*args)


def _eager_step(co, path, threads) -> StepForm:
    return StepForm(lambda x, s: co.step(x, s)[1], co.initial_state)


def _torchscript_clip(model, clip, folder, threads, co):
    path, args = os.path.join(folder, "clip.pt"), _args(co, clip)
    try:
        with _quiet():
            torch.jit.save(torch.jit.trace(model, args, check_trace=False, strict=False), path)
    except Exception as err:  # noqa: BLE001 - torch.jit fails in many ways; its first line says why
        raise Unavailable(f"torch.jit.trace fails on the offline model: {_first_line(err)}") from None
    with _quiet():
        module = torch.jit.load(path, map_location="cpu")
    return lambda: module(*args)


def _artifact_step(co, path, threads) -> StepForm:
    """The step artifact at `path` as `cocompile.loading.load_artifact` runs it (TorchScript,
    AOTInductor package)."""
    from .loading import load_artifact

    run, n = load_artifact(path).run, len(co.out_infos)
    return StepForm(lambda xs, s: run(*xs, *s)[n:], co.initial_state, co.inputs.leaves)


def _onnx_clip(model, clip, folder, threads, co):
    import onnxruntime as ort

    path = os.path.join(folder, "clip.onnx")
    try:
        with _quiet():
            torch.onnx.export(model, _args(co, clip), path, dynamo=True, external_data=False, verbose=False)
    except Exception as err:  # noqa: BLE001 - the exporter fails in many ways; its first line says why
        raise Unavailable(f"torch.onnx.export fails on the offline model: {_first_line(err)}") from None
    sess = ort.InferenceSession(path, onnx_options(threads), providers=["CPUExecutionProvider"])
    feed = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), co.inputs.leaves(clip))}
    return lambda: sess.run(None, feed)


def _onnx_step(co, path, threads) -> StepForm:
    from cocompile.runtime import Session

    sess = Session(path, threads=threads)
    return StepForm(lambda x, s: sess.step(x, s)[1], sess.initial_state,
                    lambda x: [t.numpy() for t in co.inputs.leaves(x)])


def onnx_options(threads: int | None):
    """The onnxruntime session options `cocompile.runtime.Session(path, threads)` uses, so that
    the clip runs as the step does."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    return opts


def _compiled_clip(model, clip, folder, threads, co):
    from .aoti import compiled_clip

    fn, args = compiled_clip(model), _args(co, clip)
    try:
        fn(*args)                     # compiles now: a failure says why, and no round times it
    except Exception as err:  # noqa: BLE001 - dynamo and Inductor fail in many ways
        raise Unavailable(f"torch.compile fails on the offline model: {_first_line(err)}") from None
    return lambda: fn(*args)


def _compiled_step(co, path, threads) -> StepForm:
    step = co.compiled()
    return StepForm(lambda x, s: step.step(x, s)[1], co.initial_state)


def _aoti_clip(model, clip, folder, threads, co):
    from .aoti import package_clip, runner

    path = os.path.join(folder, "clip.aoti.pt2")
    try:
        package_clip(model, _args(co, clip), path)
    except Exception as err:  # noqa: BLE001 - export, Inductor and the C++ compiler fail in many ways
        raise Unavailable(f"AOTInductor fails on the offline model: {_first_line(err)}") from None
    run, args = runner(torch._inductor.aoti_load_package(path)), [t.contiguous() for t in co.inputs.leaves(clip)]
    return lambda: run(args)


RUNTIMES = {r.name: r for r in (
    Runtime("eager", None, _eager_clip, _eager_step),
    Runtime("TorchScript", ".pt", _torchscript_clip, _artifact_step),
    Runtime("onnxruntime", ".onnx", _onnx_clip, _onnx_step),
    Runtime("compiled", None, _compiled_clip, _compiled_step),
    Runtime("AOTInductor", ".aoti.pt2", _aoti_clip, _artifact_step),
)}


# -- timing ----------------------------------------------------------------------------------------
class Stepper:
    """A call that runs `burst` steps of one stream in a row, carrying the state, over `chunks` in
    a loop (so a stream's frames keep changing, as a live stream's do)."""

    def __init__(self, step: Callable, state, chunks: list, burst: int = 1):
        self.step, self.state, self.chunks, self.i, self.burst = step, state, chunks, 0, burst

    def __call__(self):
        for _ in range(self.burst):
            self.state = self.step(self.chunks[self.i % len(self.chunks)], self.state)
            self.i += 1


def interleaved(calls: dict, rounds: int, warmup: int = WARMUP) -> dict:
    """{name: median seconds per call}: each round calls every fn once, in turn, after `warmup`
    untimed rounds; a Stepper's time is divided by its `burst` (seconds per step)."""
    times = {k: [] for k in calls}
    for i in range(warmup + rounds):
        for k, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            if i >= warmup:
                times[k].append((time.perf_counter() - t0) / getattr(fn, "burst", 1))
    return {k: statistics.median(v) for k, v in times.items()}


def calls(model, clip, co, chunks, runtimes, stream: int, folder: str, artifacts=None,
          threads: int | None = 1, log=None) -> tuple[dict, dict]:
    """({"<runtime> clip" / "<runtime> step": call}, {runtime: why the clip is missing}). The
    step artifacts are written to `folder`, unless `artifacts` gives one for a runtime."""
    fns, why = {}, {}
    for rt, clip_fn, form in _runtimes(model, clip, co, runtimes, folder, artifacts, threads, log, why):
        if clip_fn is not None:
            fns[f"{rt.name} clip"] = clip_fn
        fns[f"{rt.name} step"] = Stepper(form.call, form.initial_state(batch_of(clip, co)),
                                         [form.convert(c) for c in chunks], stream)
    return fns, why


def _runtimes(model, clip, co, runtimes, folder: str, artifacts, threads, log, why: dict):
    """Per runtime: (runtime, its clip call or None, its step form), the step's artifact written
    to `folder` unless `artifacts` gives one; why a clip is missing goes into `why`."""
    for rt in runtimes:
        path = (artifacts or {}).get(rt.name) or _write(co, rt, folder, log)
        try:
            clip_fn = rt.clip(model, clip, folder, threads, co)
        except Unavailable as err:
            clip_fn, why[rt.name] = None, str(err)
        yield rt, clip_fn, rt.step(co, path, threads)


def measure(model, clip, co, chunks, rounds: int, stream: int, folder: str, runtimes=None,
            artifacts=None, threads: int | None = 1, log=None) -> dict[str, Latency]:
    """Latency of the clip and of the step in every runtime (default all of RUNTIMES), timed
    interleaved over `rounds` rounds; `stream` steps in a row per round (at least 1)."""
    runtimes = list(RUNTIMES.values()) if runtimes is None else runtimes
    with torch.no_grad():
        fns, why = calls(model, clip, co, chunks, runtimes, max(stream, 1), folder, artifacts,
                         threads, log)
        seconds = interleaved(fns, rounds)
    return {rt.name: Latency(rt.name, seconds.get(f"{rt.name} clip"), seconds[f"{rt.name} step"],
                             why.get(rt.name, "")) for rt in runtimes}


def batch_of(clip, co) -> int:
    """Streams in a clip of `co`'s inputs (the batch of its first input, on its batch axis)."""
    return co.inputs.batch_size(co.inputs.leaves(clip))


def chunks_of(co, clip) -> list:
    """The clip cut into steps, each in the model's input structure."""
    return [co.inputs.unflatten(c) for c in co.inputs.steps(co.inputs.leaves(clip), co.step_frames)]


def _write(co, rt: Runtime, folder: str, log) -> str | None:
    if rt.suffix is None:
        return None
    path = os.path.join(folder, "step" + rt.suffix)
    t0 = time.perf_counter()
    with _quiet():
        co.export(path)
    if log:
        log(f"exported the step to {os.path.basename(path)} in {time.perf_counter() - t0:.1f} s")
    return path


def stream_drift(path: str, steps: int) -> str:
    """Whether an ONNX artifact's step slows down along a stream: its latency over `steps` steps
    from the zero state, one stream, one thread (after 200 untimed steps), as the medians of the
    first and the last thousand (or tenth) steps, measured twice: in sequence, and interleaved (a
    fresh stream and the stream at its end step in turn, which cancels the machine's drift)."""
    import numpy as np

    from cocompile.runtime import Session

    sess = Session(path, threads=1)
    x = np.random.default_rng(0).standard_normal(sess.batched_shape(1)).astype(sess.dtype)

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
    first, last = statistics.median(times[:k]), statistics.median(times[-k:])
    e, lt = (statistics.median(p[i] for p in pairs) for i in (0, 1))
    return (f"onnxruntime {os.path.basename(path)}: {steps} steps; in sequence: median of steps "
            f"1-{k} {first * 1e3:.3f} ms, of steps {steps - k + 1}-{steps} {last * 1e3:.3f} ms "
            f"({(last / first - 1) * 100:+.1f}%); interleaved: {e * 1e3:.3f} ms vs "
            f"{lt * 1e3:.3f} ms ({(lt / e - 1) * 100:+.1f}%)")


# -- the physical limit ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Machine:
    """What `threads` threads of this machine sustain, measured: float32 FLOP/s of a large
    matrix product, and bytes per second of a large copy (bytes read plus bytes written)."""

    flops: float
    bandwidth: float
    threads: int = 1

    def __str__(self) -> str:
        return (f"{self.flops / 1e9:.1f} GFLOP/s (float32 matmul), {self.bandwidth / 1e9:.1f} GB/s "
                f"(copy), {self.threads} thread{'s' * (self.threads != 1)}")


def measure_machine(threads: int = 1, size: int = 1024, megabytes: int = 64, repeats: int = 3) -> Machine:
    """Peak FLOP/s (`size`^3 float32 matmul) and memory bandwidth (a copy of `megabytes` MB,
    far beyond the caches), best of `repeats` after one untimed call, on `threads` threads.

    >>> measure_machine(size=256, megabytes=4)           # small: a test's size, not a peak
    """
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(size, size), torch.randn(size, size)
        src = torch.empty(megabytes * 2**20 // 4)
        dst = torch.empty_like(src)
        mm = _best(lambda: torch.mm(a, b), repeats)
        copy = _best(lambda: dst.copy_(src), repeats)
    finally:
        torch.set_num_threads(before)
    return Machine(2 * size ** 3 / mm, 2 * src.nbytes / copy, threads)


def _best(fn, repeats: int) -> float:
    fn()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


@dataclass(frozen=True)
class Roofline:
    """The least time one step can take on `machine`: max(FLOPs / peak FLOP/s, bytes /
    bandwidth), with bytes = the constants the step reads (weights) + its state read and
    written (2 x state bytes). Activations are not counted: a step that keeps them in cache
    pays nothing more; a step slower than its bound by much pays for dispatch, copies, or
    products too thin to run at peak."""

    flops: int
    weight_bytes: int
    state_bytes: int
    machine: Machine

    @property
    def bytes(self) -> int:
        return self.weight_bytes + 2 * self.state_bytes

    @property
    def bound(self) -> float:
        """Seconds: the larger of the compute time and the memory time."""
        return max(self.flops / self.machine.flops, self.bytes / self.machine.bandwidth)

    @property
    def limit(self) -> str:
        return "compute" if self.flops / self.machine.flops >= self.bytes / self.machine.bandwidth else "memory"

    def share(self, seconds: float | None) -> float | None:
        """A step's time over the bound (1.0: at the physical limit)."""
        return None if seconds is None else seconds / self.bound

    def __str__(self) -> str:
        m = self.machine
        return (f"roofline {ms_cell(self.bound)} ms per step ({self.limit} bound): "
                f"{self.flops / 1e6:.2f} MFLOPs / {m.flops / 1e9:.1f} GFLOP/s = "
                f"{ms_cell(self.flops / m.flops)} ms; {self.weight_bytes / 1e6:.2f} MB weights + 2 x "
                f"{self.state_bytes / 1e6:.2f} MB state / {m.bandwidth / 1e9:.1f} GB/s = "
                f"{ms_cell(self.bytes / m.bandwidth)} ms")


def roofline(co, machine: Machine, batch: int = 1) -> Roofline:
    """The roofline of one step of `co` for `batch` streams: its FLOPs (torch.utils.flop_counter,
    fused Transformer kernels off) and the bytes of the constants it reads, both observed on one
    step of a random chunk, and its state's bytes.

    >>> print(roofline(co, measure_machine()))
    """
    from torch.utils.flop_counter import FlopCounterMode

    chunk = chunks_of(co, co.inputs.unflatten(co.example_inputs(batch, frames=co.step_frames)))[0]
    state = co.initial_state(batch)
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            co.step(chunk, state)                        # traces the step graph for this batch
            reads = _ConstantReads(torch.utils._pytree.tree_leaves((chunk, state)))
            with FlopCounterMode(display=False) as flops, reads:
                co.step(chunk, state)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    return Roofline(flops.get_total_flops(), sum(reads.read.values()),
                    sum(t.nbytes for t in state), machine)


class _ConstantReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes of every tensor an op reads that the step did not make and was not given (its
    constants: weights, prepared weight layouts, adjacency), each storage counted once."""

    def __init__(self, given):
        super().__init__()
        self.seen = {_storage(t) for t in given if isinstance(t, torch.Tensor)}
        self.read: dict = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for t in torch.utils._pytree.tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor) and _storage(t) not in self.seen:
                self.read[_storage(t)] = t.untyped_storage().nbytes()
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and _storage(t) not in self.read:
                self.seen.add(_storage(t))
        return out


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def bound_cell(bound: Roofline | None, seconds: float | None) -> str:
    """`3.2x`: a step's time over its roofline bound, or `n/a`."""
    share = bound.share(seconds) if bound is not None else None
    return "n/a" if share is None or not math.isfinite(share) else f"{share:.1f}x"


# -- many streams -----------------------------------------------------------------------------------
STREAMS = (1, 4, 16, 64)          # the stream counts of the docs' table


@dataclass(frozen=True)
class Streams:
    """One batched call stepping `streams` independent streams in one runtime, against re-running
    a clip per stream (the offline model on one stream's clip, once for each stream and step).

    step  seconds per batched call (every stream advances step_frames frames)
    clip  seconds of one stream's clip in the same runtime (None: it does not export there)"""

    runtime: str
    streams: int
    step: float
    clip: float | None
    step_frames: int

    @property
    def per_stream(self) -> float:
        return self.step / self.streams

    @property
    def frames_per_second(self) -> float:
        """Frames one core takes in per second, over all streams."""
        return self.streams * self.step_frames / self.step

    def sustained(self, fps: float) -> float:
        """Streams of `fps` frames per second one core keeps up with at this batch."""
        return self.frames_per_second / fps

    def clip_sustained(self, fps: float) -> float | None:
        """The same when every stream's prediction re-runs its clip (one per step_frames frames)."""
        return None if not self.clip else self.step_frames / (fps * self.clip)


def measure_streams(model, clip, co, counts, rounds: int, folder: str, runtimes=None,
                    threads: int | None = 1, log=None) -> list[Streams]:
    """Per runtime (default eager) and stream count, one batched step of that many streams of
    random frames, and the clip of one stream, all timed interleaved over `rounds` rounds."""
    runtimes = [RUNTIMES["eager"]] if runtimes is None else runtimes
    fns, why = {}, {}
    with torch.no_grad():
        for rt, clip_fn, form in _runtimes(model, clip, co, runtimes, folder, None, threads, log, why):
            if clip_fn is not None:
                fns[f"{rt.name} clip"] = clip_fn
            for n in counts:
                batch = co.inputs.unflatten(co.example_inputs(n, torch.Generator().manual_seed(n), co.clip_length))
                chunks = [form.convert(c) for c in chunks_of(co, batch)[:8]]
                fns[f"{rt.name} {n}"] = Stepper(form.call, form.initial_state(n), chunks, max(1, 16 // n))
        seconds = interleaved(fns, rounds)
    return [Streams(rt.name, n, seconds[f"{rt.name} {n}"], seconds.get(f"{rt.name} clip"), co.step_frames)
            for rt in runtimes for n in counts]


def streams_table(rows: list[Streams], fps: float) -> str:
    """The streams' costs as a Markdown table, one row per runtime and stream count."""
    base = {r.runtime: r.per_stream for r in rows if r.streams == min(x.streams for x in rows)}
    head = ["runtime", "streams", "ms per call", "ms per stream", "vs fewest", "frames/s per core",
            f"streams at {fps:g} fps", f"clip per stream: streams at {fps:g} fps"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        clip = r.clip_sustained(fps)
        lines.append(f"| {r.runtime} | {r.streams} | {ms_cell(r.step, 2)} | {ms_cell(r.per_stream)} | "
                     f"{r.per_stream / base[r.runtime]:.2f} | {r.frames_per_second:.0f} | "
                     f"{r.sustained(fps):.1f} | {'n/a' if clip is None else f'{clip:.2f}'} |")
    return "\n".join(lines)


# -- helpers ---------------------------------------------------------------------------------------
def ratio_cell(lat: Latency, ideal: float) -> str:
    """`16.4x (102%)`: the speedup and its share of the ideal, or `n/a` with why the clip has no
    latency in this runtime."""
    if lat.speedup is None:
        return f"n/a ({lat.why})" if lat.why else "n/a"
    return f"{lat.speedup:.1f}x ({lat.share(ideal):.0%})"


def ms_cell(seconds: float | None, digits: int = 3) -> str:
    return "n/a" if seconds is None or not math.isfinite(seconds) else f"{seconds * 1e3:.{digits}f}"


def _quiet():
    from .export import _quiet as quiet_export
    return quiet_export()


def _first_line(err: Exception) -> str:
    """first_line, shortened to fit a table's line."""
    line = first_line(err)
    return line if len(line) <= 160 else line[:157] + "..."

