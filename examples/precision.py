"""Precision of every example's continual model in float64, float16 and bfloat16, judged against
float64 ground truth (docs/precision.md).

    python examples/precision.py [--size small] [--clips 3] [--only tcn stgcn] [--dtypes float16 ...]

For each example variant and dtype D: the model converted to D is compiled with its example clip
in D; on each of `--clips` clips, the truth is the model in float64 on that clip, and

    continual error = max|co_D(clip) - truth|,  offline error = max|model_D(clip) - truth|

(both relative to max(1, max|truth|)). The criterion is cocompile.verify's for float16/bfloat16:
continual <= HALF_FACTOR * offline + HALF_ULPS * eps(D). In float64 the offline error is zero
by definition: the continual model gets verify's float64 bound, rtol(float64) = 839 ulps. Approximate variants
(X3D with SE, AGCN) take their own continual form in float64 as the truth, since the causal
window is part of what they compute.

On CPU torch has no float16/bfloat16 kernel for a few ops (avg_pool3d): `HalfFallback` runs those
in float32 and rounds the result to D (as CUDA's half kernels accumulate in float32), for the
offline and the continual model alike; the table marks such rows.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import math
import os
import tempfile
import time
from dataclasses import dataclass

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import cocompile
from cocompile.quantize import Recipe, write_quantized
from cocompile.verify import HALF_FACTOR, HALF_ULPS, is_half, rtol

EXAMPLES = ("x3d", "r2plus1d", "slow_resnet", "tcn", "stgcn", "oadtr", "audio_transformer", "crnn",
            "kws_lstm", "unet_audio", "video_unet", "slowfast", "conditioned_tcn")
DTYPES = ("float64", "float16", "bfloat16")


def cases(names=EXAMPLES) -> list[tuple]:
    """(label, module, build kwargs, approximate) of every variant of the named examples."""
    out = []
    for name in names:
        mod = importlib.import_module(name)
        for label, kwargs, approximate in getattr(mod, "VARIANTS", ((name, {}, False),)):
            out.append((label, mod, kwargs, approximate))
    return out


class HalfFallback(TorchDispatchMode):
    """Ops without a float16/bfloat16 kernel on this device run in float32, rounded back."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        try:
            return func(*args, **kwargs)
        except NotImplementedError:
            low = {t.dtype for t in pytree.tree_leaves((args, kwargs))
                   if isinstance(t, torch.Tensor) and t.dtype in (torch.float16, torch.bfloat16)}
            if len(low) != 1:
                raise
            dtype = low.pop()
            up = pytree.tree_map(lambda t: t.float() if isinstance(t, torch.Tensor) and t.dtype == dtype else t,
                                 (args, kwargs))
            out = func(*up[0], **up[1])
            return pytree.tree_map(lambda t: t.to(dtype) if isinstance(t, torch.Tensor)
                                   and t.dtype == torch.float32 else t, out)


@dataclass
class Row:
    """One example variant in one dtype: relative errors against the truth, worst over clips."""

    label: str
    dtype: str
    offline: float          # max|model_D - truth| / max(1, max|truth|)
    continual: float        # max|co_D - truth| / max(1, max|truth|)
    slack: float            # the criterion's worst margin: continual - allowed (<= 0: met)
    fallback: bool          # some op ran in float32 (no CPU kernel in the dtype)
    seconds: float
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.slack <= 0

    @property
    def ratio(self) -> float:
        return self.continual / self.offline if self.offline else math.inf


def _rel(got: torch.Tensor, truth: torch.Tensor) -> float:
    """Relative error; inf where `got` is not finite (an overflow in the dtype)."""
    err = float((got.double() - truth).abs().max()) / max(1.0, float(truth.abs().max()))
    return err if math.isfinite(err) else math.inf


def _allowed(offline: float, dtype: torch.dtype) -> float:
    """The criterion's bound on the continual model's relative error. float64 is the truth's own
    dtype (offline error 0): the continual model gets rtol(float64), the 839 ulps float32 gets."""
    if not is_half(dtype):
        return rtol(dtype)
    return HALF_FACTOR * offline + HALF_ULPS * torch.finfo(dtype).eps


def cast(clip, dtype: torch.dtype):
    """A clip (a tensor or the model's structure of inputs) with its float tensors in `dtype`."""
    return pytree.tree_map(lambda t: t.to(dtype) if t.is_floating_point() else t, clip)


def _args(clip) -> tuple:
    """model(*args) for a clip: a tuple is the positional arguments, anything else one argument."""
    return clip if isinstance(clip, tuple) else (clip,)


def _needs_fallback(model, clip) -> bool:
    try:
        with torch.no_grad():
            model(*_args(clip))
        return False
    except NotImplementedError:
        return True


def measure(label, mod, kwargs, approximate, dtype: torch.dtype, size="small", clips=3) -> Row:
    """Compile the variant in `dtype` and judge it on `clips` clips (see the module docstring)."""
    t0, td = time.perf_counter(), getattr(mod, "TIME_DIM", 2)
    base = mod.build(size, **kwargs)
    wide, model = copy.deepcopy(base).double(), copy.deepcopy(base).to(dtype)
    fallback = _needs_fallback(model, cast(mod.example_input(size), dtype))
    mode = HalfFallback() if fallback else contextlib.nullcontext()
    with mode:    # verify=False under the fallback: compile's own check would run without it
        co = cocompile.compile(model, cast(mod.example_input(size), dtype), time_dim=td,
                               approximate=approximate, verify=not fallback)
        co64 = cocompile.compile(wide, cast(mod.example_input(size), torch.float64), time_dim=td,
                                 approximate=True) if approximate else None
        eps, worst = torch.finfo(dtype).eps, (0.0, 0.0, -math.inf)
        for seed in range(clips):
            clip = mod.example_input(size, seed=seed)
            with torch.no_grad():
                wide_clip = cast(clip, torch.float64)
                truth = pytree.tree_leaves(wide(*_args(wide_clip)))
                truth_co = pytree.tree_leaves(co64.forward_steps(wide_clip)) if approximate else truth
                off = pytree.tree_leaves(model(*_args(cast(clip, dtype))))
                got = pytree.tree_leaves(co.forward_steps(cast(clip, dtype)))
            for t, tc, o, g in zip(truth, truth_co, off, got):
                e_off, e_co = _rel(o, t), _rel(g, tc)
                slack = e_co - _allowed(e_off, dtype) if math.isfinite(e_off) else 0.0
                worst = (max(worst[0], e_off), max(worst[1], e_co), max(worst[2], slack))
    note = "" if math.isfinite(worst[0]) else "the offline model overflows in this dtype"
    return Row(label, str(dtype).removeprefix("torch."), *worst, fallback, time.perf_counter() - t0, note)


def format_table(rows: list[Row]) -> str:
    """Errors relative to max(1, max|truth|), and in ulps of the dtype."""
    head = (f"{'model':<16}{'dtype':>9}{'offline':>11}{'continual':>11}{'(ulps)':>8}{'ratio':>7}"
            f"  criterion")
    lines = [head, "-" * len(head)]
    for r in rows:
        ulps = r.continual / torch.finfo(getattr(torch, r.dtype)).eps
        verdict = ("met" if r.ok else "NOT MET") + (" (fallback)" if r.fallback else "")
        lines.append(f"{r.label:<16}{r.dtype:>9}{r.offline:>11.3g}{r.continual:>11.3g}{ulps:>8.1f}"
                     f"{r.ratio:>7.2f}  {r.note or verdict}")
    return "\n".join(lines)


def artifacts(label, mod, kwargs, approximate, dtype: torch.dtype, folder: str,
              size="small", suffixes=(".onnx", ".pt", ".pt2")) -> list[str]:
    """Each artifact of the variant compiled in `dtype`: its E4 against the eager step in the same
    dtype (cocompile.export.check_artifact), or why it was refused. One line per artifact."""
    from cocompile.export import check_artifact

    model = mod.build(size, **kwargs).to(dtype)
    clip = cast(mod.example_input(size), dtype)
    fallback = _needs_fallback(model, clip)
    lines = []
    with HalfFallback() if fallback else contextlib.nullcontext():
        co = cocompile.compile(model, clip, time_dim=getattr(mod, "TIME_DIM", 2),
                               approximate=approximate, verify=not fallback)
        for suffix in suffixes:
            path = os.path.join(folder, f"{label}_{str(dtype)[6:]}{suffix}")
            try:
                co.export(path)
                e4 = check_artifact(co, path)
                ulps = e4.error / torch.finfo(dtype).eps
                lines.append(f"{label:<16}{str(dtype)[6:]:>9} {suffix:<5} E4 {e4.error:.3g} "
                             f"({ulps:.1f} ulps, bound {e4.bound:.3g}) {'ok' if e4.passed else 'FAIL'}")
            except cocompile.CompileError as err:
                lines.append(f"{label:<16}{str(dtype)[6:]:>9} {suffix:<5} refused: {err.reason}")
            except Exception as err:  # noqa: BLE001 - e.g. a kernel onnxruntime lacks at run time
                lines.append(f"{label:<16}{str(dtype)[6:]:>9} {suffix:<5} FAILED: "
                             f"{type(err).__name__}: {str(err).splitlines()[0][:150]}")
            print(lines[-1], flush=True)
    return lines


# -- int8 -------------------------------------------------------------------------------------------
INT8 = (("x3d", {}, "s"), ("stgcn", {"variant": "stride1"}, "full"), ("tcn", {}, "full"))


def kernels(path: str) -> dict:
    """{op type: count} of the kernels onnxruntime ran in one step of the artifact at `path`
    (from its profile, after its graph optimisations: fused QLinearConv etc.)."""
    import json
    from collections import Counter

    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.enable_profiling, opts.intra_op_num_threads = True, 1
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    feed = {i.name: np.zeros([d if isinstance(d, int) else 1 for d in i.shape],
                             np.int64 if "int64" in i.type else np.float32) for i in sess.get_inputs()}
    sess.run(None, feed)
    with open(sess.end_profiling()) as f:
        events = json.load(f)
    os.remove(f.name)
    return dict(Counter(e["args"]["op_name"] for e in events
                        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")))


RECIPES = {"float boundary": Recipe(), "int8 boundary": Recipe(boundary=False),
           "float boundary, 7-bit weights": Recipe(reduce_range=True)}


def int8_row(name: str, kwargs: dict, size: str, folder: str, recipe: str = "float boundary",
             calibration: int = 8, steps: int = 10_000, rounds: int = 30) -> dict:
    """Quantize one example: its deviation from the float step, the deviation over the first 3·T
    and the last 3·T of `steps` steps, and the step latency of the int8 and the float32 ONNX step
    (batch 1, 1 thread, interleaved medians), with the kernels the int8 step ran."""
    from cocompile.bench import interleaved
    from cocompile.quantize import onnx_step, stream_deviation

    mod = importlib.import_module(name)
    co = cocompile.compile(mod.build(size, **kwargs), mod.example_input(size),
                           time_dim=getattr(mod, "TIME_DIM", 2), verify=False)
    f32, q8 = os.path.join(folder, f"{name}_f32.onnx"), os.path.join(folder, f"{name}_int8.onnx")
    co.export(f32)
    t0 = time.perf_counter()
    clips = [mod.example_input(size, seed=s) for s in range(calibration)]
    write_quantized(co, q8, "int8", clips, RECIPES[recipe])
    seconds = time.perf_counter() - t0
    dev = stream_deviation(co, q8, steps, reference=f32)
    w = 3 * co.clip_length
    x = [t.numpy() for t in co.example_inputs(1, torch.Generator().manual_seed(0))]
    calls = {}
    for label, path in (("float32", f32), ("int8", q8)):
        step, box = onnx_step(co, path), [[t.numpy() for t in co.initial_state(1)]]
        calls[label] = (lambda s=step, b=box: b.__setitem__(0, s(x, b[0])[1]))
    ms = {k: v * 1e3 for k, v in interleaved(calls, rounds).items()}
    return dict(model=f"{name} ({size})", recipe=recipe, T=co.clip_length, quantize_s=seconds,
                deviation=json_meta(q8)["quantization"]["deviation"],
                first=max(dev[:w]), last=max(dev[-w:]), steps=steps, float32_ms=ms["float32"],
                int8_ms=ms["int8"], kernels=kernels(q8))


def json_meta(path: str) -> dict:
    import json

    import onnx
    return json.loads({p.key: p.value for p in onnx.load(path).metadata_props}["cocompile"])


def format_int8(rows: list[dict]) -> str:
    head = (f"{'model':<20}{'recipe':<31}{'T':>5}{'deviation':>11}{'first 3T':>10}{'last 3T':>10}{'growth':>8}"
            f"{'float32 ms':>12}{'int8 ms':>9}{'speedup':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['model']:<20}{r['recipe']:<31}{r['T']:>5}{r['deviation']:>11.3g}{r['first']:>10.3g}"
                     f"{r['last']:>10.3g}{r['last'] / r['first']:>7.2f}x{r['float32_ms']:>12.3f}"
                     f"{r['int8_ms']:>9.3f}{r['float32_ms'] / r['int8_ms']:>8.2f}x")
    for r in rows:
        lines.append(f"{r['model']}, {r['recipe']}: quantized in {r['quantize_s']:.0f} s; kernels "
                     f"{r['kernels']}")
    return "\n".join(lines)


def main(argv=None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("small", "full"), default="small")
    parser.add_argument("--clips", type=int, default=3)
    parser.add_argument("--only", nargs="*", default=list(EXAMPLES), help="examples to measure")
    parser.add_argument("--dtypes", nargs="*", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--artifacts", action="store_true",
                        help="instead: export each variant in each dtype and check E4")
    parser.add_argument("--int8", action="store_true",
                        help="instead: quantize X3D-S, the stride-1 ST-GCN and the TCN (see INT8)")
    parser.add_argument("--steps", type=int, default=10_000, help="--int8: stream length")
    parser.add_argument("--recipes", nargs="*", default=["float boundary"], choices=list(RECIPES),
                        help="--int8: what stays float (cocompile.quantize.Recipe)")
    args = parser.parse_args(argv)
    if args.int8:
        torch.set_num_threads(1)
        with tempfile.TemporaryDirectory() as tmp:
            rows = []
            for name, kwargs, size in INT8:
                for recipe in args.recipes if name in args.only else ():
                    rows.append(int8_row(name, kwargs, size, tmp, recipe, steps=args.steps))
                    print(format_int8(rows[-1:]), flush=True)
            print(format_int8(rows))
            return rows
    if args.artifacts:
        with tempfile.TemporaryDirectory() as tmp:
            return [line for case in cases(args.only) for name in args.dtypes
                    for line in artifacts(*case, getattr(torch, name), tmp, args.size)]
    rows = []
    for label, mod, kwargs, approximate in cases(args.only):
        for name in args.dtypes:
            rows.append(measure(label, mod, kwargs, approximate, getattr(torch, name), args.size, args.clips))
            print(format_table(rows[-1:]).splitlines()[-1], f"  ({rows[-1].seconds:.0f} s)", flush=True)
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    main()
