"""verify(): equivalence of a continual model with the untouched offline model (E1, E2 of
docs/design.md)."""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field

import torch
from torch.utils import _pytree as pytree

from .errors import CompileError
from .model import ContinualModel

RTOL = 1e-4   # max|Δ| <= RTOL * max(1, max|ref|), float32
# float16/bfloat16 are judged against the model in float64, the ground truth (docs/precision.md):
# max|co - truth| <= HALF_FACTOR * max|model - truth| + HALF_ULPS * eps * max(1, max|truth|)
HALF_FACTOR, HALF_ULPS = 2.0, 4.0


@dataclass(frozen=True)
class Check:
    """One comparison: which output, how far apart, the bound, and whether it is claimed exact."""

    name: str
    output: int
    error: float
    bound: float
    claimed: bool
    detail: str = ""      # why the error is infinite (outputs of different shapes)
    scale: float = 1.0    # max(1, max|ref|): error / scale is the relative error

    @property
    def ok(self) -> bool:
        return self.error <= self.bound


@dataclass
class Report:
    """Result of `verify`. `passed` is True when every claimed equivalence holds; unclaimed checks
    (E2 on padded models, anything approximate) are measured and reported, not judged."""

    checks: list[Check] = field(default_factory=list)
    approximate: bool = False
    exact_sliding: bool = False
    horizon: int = 0          # causal attention over the whole clip: frames of keys kept

    @property
    def passed(self) -> bool:
        return all(c.ok for c in self.checks if c.claimed)

    def max_error(self, name: str) -> float:
        return max((c.error for c in self.checks if c.name == name), default=0.0)

    def __str__(self) -> str:
        lines = [f"{'check':<6}{'output':>7}{'max |err|':>12}{'bound':>11}  verdict"]
        for c in self.checks:
            verdict = ("ok" if c.ok else "FAIL") if c.claimed else "measured (not claimed exact)"
            lines.append(f"{c.name:<6}{c.output:>7}{c.error:>12.3g}{c.bound:>11.3g}  {verdict}")
        if self.approximate:
            lines.append("approximate: a non-causal op (a clip reduction broadcast onto frames, a "
                         "norm over time) uses a causal window; "
                         f"E1 deviation {self.max_error('E1'):.3g}")
        if self.horizon:
            lines.append(f"bounded: causal attention reaches back to the start of the clip; the "
                         f"stream keeps the last {self.horizon} frames of keys, so it equals the "
                         f"model for the first {self.horizon} frames and sees only the last "
                         f"{self.horizon} after (not the model on the whole stream)")
        lines.append("PASSED" if self.passed else "FAILED")
        return "\n".join(lines)


def rtol(dtype: torch.dtype) -> float:
    """Relative bound of a continual model against the model, both in `dtype`. RTOL is 839 ulps of
    float32 (eps 1.19e-7); every floating dtype gets as many of its own (float64: 1.9e-13).
    float16/bfloat16 models are judged against float64 instead (HALF_FACTOR, HALF_ULPS); this
    bound (0.82 and 6.6) serves only when the model cannot run in float64.

    >>> rtol(torch.float32), rtol(torch.float64)
    (0.0001, 1.862645149230957e-13)
    """
    if not dtype.is_floating_point:
        return RTOL
    return RTOL * torch.finfo(dtype).eps / torch.finfo(torch.float32).eps


def is_half(dtype: torch.dtype) -> bool:
    """float16, bfloat16: dtypes whose rounding error is judged against float64 ground truth."""
    return dtype.is_floating_point and torch.finfo(dtype).bits < 32


def _scale(ref: torch.Tensor) -> float:
    return max(1.0, float(ref.abs().max()) if ref.numel() else 0.0)


def _bound(ref: torch.Tensor) -> float:
    return rtol(ref.dtype) * _scale(ref)


def _judge(got: torch.Tensor, ref: torch.Tensor, truth: torch.Tensor | None) -> dict:
    """error, bound and scale of `got` against the model's `ref`, or, given `truth` (the model in
    float64, for float16/bfloat16 models), against the truth: no further from it than the model's
    own rounding error times HALF_FACTOR, plus HALF_ULPS ulps of the output's scale."""
    if truth is None:
        return dict(error=_err(got, ref), bound=_bound(ref), scale=_scale(ref))
    slack = HALF_ULPS * torch.finfo(ref.dtype).eps * _scale(truth)
    return dict(error=_err(got, truth), bound=HALF_FACTOR * _err(ref, truth) + slack, scale=_scale(truth))


def _float64(model: torch.nn.Module, dtype: torch.dtype):
    """The ground truth for a float16/bfloat16 model: a float64 copy of it (None otherwise, or if
    the model cannot be copied)."""
    if not is_half(dtype):
        return None
    try:
        return copy.deepcopy(model).double()
    except Exception:  # noqa: BLE001 - the coarse bound of rtol() judges instead
        return None


def _truth(wide, co, x, n: int) -> list:
    """The float64 model's outputs on `x` (n Nones without it, or when it cannot run)."""
    if wide is not None:
        x = pytree.tree_map(lambda t: t.double() if t.is_floating_point() else t, x)
        try:
            return pytree.tree_leaves(wide(*co.inputs.args(x)))
        except Exception:  # noqa: BLE001 - e.g. a dtype cast the captured graph keeps
            pass
    return [None] * n


def _outputs(model, co, x) -> list:
    """model(x) as leaves (x in the structure of the model's inputs); a model without kernels for
    its dtype on x's device is a CompileError."""
    try:
        return pytree.tree_leaves(model(*co.inputs.args(x)))
    except NotImplementedError as err:
        raise CompileError(f"the model does not run in {co.dtype} on {co.device}: "
                           f"{str(err).strip().splitlines()[0]}",
                           hint="the continual model runs the same kernels: use it where they exist "
                                "(e.g. float16 on CUDA) or another dtype; compile(..., verify=False) "
                                "skips this check") from None


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


@torch.no_grad()
def verify(model: torch.nn.Module, co: ContinualModel, clip: torch.Tensor,
           sliding_steps: int | None = None) -> Report:
    """E1 on `clip` (stepping + flush == model(clip)); E2 on a stream that continues the clip for
    `sliding_steps` steps once clip-level outputs are valid (default: one clip's worth; 0 skips
    E2): they equal the model on the last T frames (claimed only without temporal padding).

    >>> report = cocompile.verify(model, co, torch.randn(1, 3, 16, 64, 64))
    >>> report.passed
    True
    """
    with _evaluating(model):
        report = Report(approximate=co.approximate, exact_sliding=co.exact_sliding,
                        horizon=max(i.horizon for i in co.out_infos))
        wide = _float64(model, co.dtype)          # ground truth of float16/bfloat16 models
        report.checks += _clip_checks(model, co, clip, wide)
        report.checks += _sliding(model, co, clip, sliding_steps, wide)
        return report


@torch.no_grad()
def check_clip(model: torch.nn.Module, co: ContinualModel, clip: torch.Tensor) -> None:
    """compile()'s own E1 check on the example clip: a CompileError with the measured error when
    an exact model differs from the offline one; an approximate model keeps its measured
    deviation (relative to max(1, max|ref|)) in `co.deviation`.

    >>> check_clip(model, co, clip)        # silent when E1 holds
    """
    with _evaluating(model):
        checks = _clip_checks(model, co, clip, _float64(model, co.dtype))
    co.deviation = max((c.error / c.scale for c in checks), default=0.0)
    bad = [c for c in checks if c.claimed and not c.ok]
    if bad:
        worst = max(bad, key=lambda c: c.error / c.bound)
        differs = worst.detail or f"differs by {worst.error:.3g} (allowed {worst.bound:.3g})"
        raise CompileError(f"the continual model does not reproduce the model on the example clip "
                           f"(E1): output {worst.output} {differs}, so it is not returned",
                           hint="this is a bug in cocompile or in an op rule registered for this "
                                "model; please report it with the model. compile(..., verify=False) "
                                "returns the model anyway, for inspection with cocompile.verify")


@contextlib.contextmanager
def _evaluating(model):
    """The model in eval mode for the block (an exported program's module is already inference)."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
    except NotImplementedError:
        pass
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


def _clip_checks(model, co: ContinualModel, clip, wide=None) -> list[Check]:
    """E1: every output of stepping through `clip` and flushing against model(clip) (and against
    `wide`(clip), the float64 ground truth, for float16/bfloat16 models: see _judge)."""
    ref = _outputs(model, co, clip)
    got = pytree.tree_leaves(co.forward_steps(clip))
    if len(got) != len(ref):
        return [Check("E1", 0, float("inf"), _bound(ref[0]), not co.approximate,
                      f"is one of {len(got)} outputs where the model has {len(ref)}")]
    truth = _truth(wide, co, clip, len(ref))
    return [Check("E1", i, claimed=not co.approximate, detail=_shapes(g, r), **_judge(g, r, t))
            for i, (r, g, t) in enumerate(zip(ref, got, truth))]


def _shapes(got, ref) -> str:
    if got.shape == ref.shape:
        return ""
    return f"has shape {tuple(got.shape)} where the model's has {tuple(ref.shape)}"


def _continued(co: ContinualModel, leaves: list, frames: int) -> list:
    """Each time input continued by `frames` frames (of the fastest input) of random values at the
    clip's scale; side inputs as they are."""
    out = []
    for t, s in zip(leaves, co.inputs.specs):
        if s.is_time:
            shape = list(t.shape)
            shape[s.time_dim] = s.frames(frames)
            extra = torch.randn(shape, dtype=t.dtype, device=t.device) * t.std() + t.mean()
            t = torch.cat([t, extra], s.time_dim)
        out.append(t)
    return out


def _sliding(model, co: ContinualModel, clip, steps, wide=None) -> list[Check]:
    """E2: after every step from the first at which the clip-level outputs are valid, compare them
    with the model on the last T frames, for `steps` steps (default: one clip's worth)."""
    clip_outs = [i for i, info in enumerate(co.out_infos) if info.per_step]
    c, T = co.step_frames, co.clip_length
    steps = T // c if steps is None else steps
    if not clip_outs or steps <= 0:
        return []
    first = max([T] + [co.out_infos[i].ready for i in clip_outs])
    first = -(-first // c) * c                         # whole steps
    stream = _continued(co, co.inputs.leaves(clip), first - T + steps * c)
    state, errs = co.initial_state(co.inputs.batch_size(stream)), {i: (0.0, 0.0, 1.0) for i in clip_outs}
    for k, chunk in enumerate(co.inputs.steps(stream, c)):
        outs, state = co.step(co.inputs.unflatten(chunk), state)
        end = (k + 1) * c
        if end < first:
            continue
        window = co.inputs.unflatten(co.inputs.window(stream, end - T, T))
        ref = _outputs(model, co, window)
        truth, leaves = _truth(wide, co, window, len(ref)), pytree.tree_leaves(outs)
        for i in clip_outs:
            e, b, s = errs[i]
            j = _judge(leaves[i], ref[i], truth[i])
            errs[i] = (max(e, j["error"]), max(b, j["bound"]), max(s, j["scale"]))
    claimed = co.exact_sliding and not co.approximate
    return [Check("E2", i, e, b, claimed, scale=s) for i, (e, b, s) in errs.items()]
