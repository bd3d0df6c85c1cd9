"""verify(): equivalence of a continual model with the untouched offline model (DESIGN.md §3)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils import _pytree as pytree

from .model import ContinualModel

RTOL = 1e-4   # max|Δ| <= RTOL * max(1, max|ref|), float32


@dataclass(frozen=True)
class Check:
    """One comparison: which output, how far apart, the bound, and whether it is claimed exact."""

    name: str
    output: int
    error: float
    bound: float
    claimed: bool

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
            lines.append("approximate: a clip reduction broadcast onto frames uses a causal window; "
                         f"E1 deviation {self.max_error('E1'):.3g}")
        if self.horizon:
            lines.append(f"bounded: causal attention reaches back to the start of the clip; the "
                         f"stream keeps the last {self.horizon} frames of keys, so it equals the "
                         f"model for the first {self.horizon} frames and sees only the last "
                         f"{self.horizon} after (not the model on the whole stream)")
        lines.append("PASSED" if self.passed else "FAILED")
        return "\n".join(lines)


def _bound(ref: torch.Tensor) -> float:
    return RTOL * max(1.0, float(ref.abs().max()) if ref.numel() else 0.0)


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
    was = model.training
    model.eval()
    try:
        report = Report(approximate=co.approximate, exact_sliding=co.exact_sliding,
                        horizon=max(i.horizon for i in co.out_infos))
        ref = pytree.tree_leaves(model(clip))
        got = pytree.tree_leaves(co.forward_steps(clip))
        for i, (r, g) in enumerate(zip(ref, got)):
            report.checks.append(Check("E1", i, _err(g, r), _bound(r), not co.approximate))
        report.checks += _sliding(model, co, clip, sliding_steps)
        return report
    finally:
        model.train(was)


def _sliding(model, co: ContinualModel, clip, steps) -> list[Check]:
    """E2: after every step from the first at which the clip-level outputs are valid, compare them
    with the model on the last T frames, for `steps` steps (default: one clip's worth)."""
    clip_outs = [i for i, info in enumerate(co.out_infos) if info.per_step]
    c, T, td = co.step_frames, co.clip_length, co.time_dim
    steps = T // c if steps is None else steps
    if not clip_outs or steps <= 0:
        return []
    first = max([T] + [co.out_infos[i].ready for i in clip_outs])
    first = -(-first // c) * c                         # whole steps
    shape = list(clip.shape)
    shape[td] = first - T + steps * c
    extra = torch.randn(shape, dtype=clip.dtype) * clip.std() + clip.mean()
    stream = torch.cat([clip, extra], td)
    state, errs = co.initial_state(clip.shape[0]), {i: (0.0, 0.0) for i in clip_outs}
    for k, chunk in enumerate(stream.split(c, dim=td)):
        outs, state = co.step(chunk, state)
        end = (k + 1) * c
        if end < first:
            continue
        ref = pytree.tree_leaves(model(stream.narrow(td, end - T, T)))
        leaves = pytree.tree_leaves(outs)
        for i in clip_outs:
            e, b = errs[i]
            errs[i] = (max(e, _err(leaves[i], ref[i])), max(b, _bound(ref[i])))
    claimed = co.exact_sliding and not co.approximate
    return [Check("E2", i, e, b, claimed) for i, (e, b) in errs.items()]
