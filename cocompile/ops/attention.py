"""Attention over time (scaled_dot_product_attention whose query/key positions are frames).

Three step forms, chosen per attention node; all are exact (E1, and E2 without a mask):

  * causal: the mask is a causal band (each position sees the previous w, `is_causal` or a
    mask such as `generate_square_subsequent_mask`) and query, key and value are streamed frames.
    The output is streamed frame by frame; a key/value cache keeps the last w-1 frames. Exact on
    any stream (E3) when w is shorter than the clip; a causal mask over the whole clip is kept
    to the last T keys (`horizon`): the model for the first T frames, bounded after.
  * single-output: the outputs read only the newest positions of this attention (demand
    analysis), so only the newest queries are computed, against the cached window of keys and
    values (O(n*d) instead of O(n^2*d), and the per-token projections are computed once).
  * window: every position is needed (a later layer's keys, a mean over tokens): the attention
    is re-run over the window each step, from the cached per-token queries, keys and values.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import Refusal
from ..timeinfo import ALL, DEMAND, NEWEST, TIME, WINDOW, TimeInfo
from .clip import ClipWindow
from .convert import newest
from .frames import cat_frames, frames_shape, last_frames
from .pointwise import join
from .registry import OpRule, register_op
from .schema import bind

aten = torch.ops.aten
MODE = "cocompile.attention"     # node.meta key of the chosen form
CAUSAL, SINGLE, WHOLE = "causal", "single-output", "window"


@dataclass(frozen=True)
class Form:
    kind: str                   # CAUSAL, SINGLE or WHOLE
    band: int | None = None     # causal: positions each query sees (itself included)


def causal_band(allowed: torch.Tensor) -> int | None:
    """w if allowed[i, j] == (0 <= i - j < w) for a square boolean mask, else None."""
    n = allowed.shape[-1]
    if allowed.dim() != 2 or allowed.shape[0] != n:
        return None
    w = int(allowed[-1].sum())
    pos = torch.arange(n, device=allowed.device)
    lag = pos[:, None] - pos[None, :]
    return w if w > 0 and torch.equal(allowed, (lag >= 0) & (lag < w)) else None


def _allowed(mask: torch.Tensor) -> torch.Tensor:
    """Boolean mask (True: attend) of a boolean or additive float mask, leading 1-axes dropped."""
    while mask.dim() > 2 and mask.shape[0] == 1:
        mask = mask[0]
    return mask if mask.dtype == torch.bool else mask > float("-inf")


@register_op(aten.scaled_dot_product_attention.default)
class Attention(OpRule):
    reads_windows = True

    # -- analysis ------------------------------------------------------------------------------
    def time(self, node, an):
        q, k, v = node.args[:3]
        infos = {a: an.info(a) for a in (q, k, v)}
        over = {a: i for a, i in infos.items() if i.kind in (TIME, WINDOW)
                and i.dim >= a.meta["val"].dim() - 2}
        if not over:                             # time on a leading axis: attention per frame
            args = [a for a in node.args if isinstance(a, torch.fx.Node)]
            return join(an, node, args, lambda arg, info: info.dim)
        if any(i.dim == a.meta["val"].dim() - 1 for a, i in over.items()):
            raise Refusal("attention whose feature axis holds time mixes frames",
                          "put tokens (time) on axis -2 of query, key and value")
        if k not in over or v not in over:
            if q in over and not any(infos[a].kind in (TIME, WINDOW) for a in (k, v)):
                return join(an, node, [q], lambda arg, info: info.dim)   # fixed memory: per query
            raise Refusal("attention whose keys and values do not both run along time",
                          "attend over the tokens with keys and values from the same frames")
        ik, iv = infos[k], infos[v]
        if (ik.length, ik.rate, ik.outer, ik.inner) != (iv.length, iv.rate, iv.outer, iv.inner):
            raise Refusal("keys and values of this attention hold different frames",
                          "compute keys and values from the same tokens")
        form = self._form(node, an, infos, over)
        node.meta[MODE] = form
        return getattr(self, f"_time_{form.kind.replace('-', '_')}")(node, an, form)

    def _form(self, node, an, infos, over) -> Form:
        q, k, v = node.args[:3]
        allowed = self._allowed(node, an)
        streamed = all(infos[a].kind == TIME for a in (q, k, v)) and q in over
        band = causal_band(allowed) if allowed is not None else None
        if streamed and band is not None and infos[q].length == infos[k].length \
                and infos[q].rate == infos[k].rate:
            return Form(CAUSAL, band)
        if node.meta.get(DEMAND, ALL) == NEWEST and q in over:
            return Form(SINGLE)
        return Form(WHOLE)

    def _allowed(self, node, an) -> torch.Tensor | None:
        """The mask as a boolean (query, key) matrix, None without one (full attention)."""
        b = bind(node.target, node.args, node.kwargs)
        n_q, n_k = node.args[0].meta["val"].shape[-2], node.args[1].meta["val"].shape[-2]
        if b.get("is_causal"):
            return torch.ones(n_q, n_k, dtype=torch.bool, device=node.args[0].meta["val"].device).tril()
        mask = b.get("attn_mask")
        if mask is None:
            return None
        if an.info(mask).kind != "static":
            raise Refusal("the attention mask depends on the input (e.g. a key padding mask)",
                          "use a mask built from constants, or no mask")
        value = an.static_value(mask)
        if value is None:
            raise Refusal("the attention mask depends on the batch size",
                          "build the mask as a (T, T) tensor broadcast over the batch")
        return _allowed(value)

    def _time_causal(self, node, an, form):
        q, k, v = node.args[:3]
        infos = [an.info(a) for a in (q, k, v)]
        warmup = max(i.warmup for i in infos)
        for a in (q, k, v):
            an.aligned(a, warmup)
        x = infos[0]
        whole = form.band >= x.length       # reaches the clip start: bounded to the clip
        return x.replace(warmup=warmup, rf=max(i.rf for i in infos) + int((form.band - 1) / x.rate),
                         padded=True, approx=any(i.approx for i in infos),
                         horizon=max([x.length if whole else 0] + [i.horizon for i in infos]))

    def _time_single_output(self, node, an, form):
        q, k, v = node.args[:3]
        iq = an.info(q)
        windows = [self._window(an, a) for a in (k, v)]
        return iq.replace(kind=TIME, ready=0, rf=max([iq.rf] + [w.rf for w in windows]),
                          padded=any(w.padded for w in windows + [iq]),
                          approx=any(w.approx for w in windows + [iq]),
                          horizon=max(w.horizon for w in windows + [iq]))

    def _time_window(self, node, an, form):
        q, k, v = node.args[:3]
        windows = [self._window(an, a) for a in (q, k, v) if an.info(a).kind in (TIME, WINDOW)]
        ready = max(w.ready for w in windows)
        base = self._window(an, q) if an.info(q).kind in (TIME, WINDOW) else TimeInfo("clip")
        return base.replace(ready=ready, rf=max(w.rf for w in windows),
                            padded=any(w.padded for w in windows),
                            approx=any(w.approx for w in windows),
                            horizon=max(w.horizon for w in windows))

    @staticmethod
    def _window(an, arg) -> TimeInfo:
        info = an.info(arg)
        return ClipWindow.window(an, arg) if info.kind == TIME else info

    def states(self, node, an):
        form, out = node.meta.get(MODE), {}
        if form is None:
            return out
        q, k, v = node.args[:3]
        if form.kind == CAUSAL:
            if form.band > 1:
                for key, a in (("k", k), ("v", v)):
                    out[key] = (frames_shape(a, an.info(a), form.band - 1), a.meta["val"].dtype,
                                f"last {form.band - 1} frames of the attention's {key} (cache)")
            return out
        cached = (("k", k), ("v", v)) if form.kind == SINGLE else (("q", q), ("k", k), ("v", v))
        for key, a in self._distinct(cached):
            if an.info(a).kind == TIME:
                out.update(ClipWindow.states(a, an.info(a), key))
        return out

    @staticmethod
    def _distinct(pairs):
        seen, out = set(), []
        for key, a in pairs:
            if a not in seen:
                seen.add(a)
                out.append((key, a))
        return out

    # -- step ----------------------------------------------------------------------------------
    def step(self, node, args, kwargs, ctx):
        form = node.meta.get(MODE)
        if form is None:
            return node.target(*args, **kwargs)
        return getattr(self, f"_step_{form.kind.replace('-', '_')}")(node, args, kwargs, ctx, form)

    def _windows(self, node, args, ctx, keys):
        """args with each streamed input among `keys` replaced by its cached window."""
        args, done = list(args), {}
        for key, i in keys:
            a = node.args[i]
            if ctx.info(a).kind == TIME:
                if a not in done:
                    done[a] = ClipWindow.frames(ctx, node, a, args[i], key)
                args[i] = done[a]
        return args

    def _step_window(self, node, args, kwargs, ctx, form):
        args = self._windows(node, args, ctx, (("q", 0), ("k", 1), ("v", 2)))
        return node.target(*args, **kwargs)

    def _step_single_output(self, node, args, kwargs, ctx, form):
        b = bind(node.target, node.args, node.kwargs)
        q_info = ctx.info(node.args[0])
        args = self._windows(node, args, ctx, (("k", 1), ("v", 2)))
        q = args[0] if q_info.kind == TIME else newest(ctx, q_info, args[0])
        n_q, m = node.args[0].meta["val"].shape[-2], q.shape[-2]
        mask = None
        if b.get("is_causal"):
            mask = torch.ones(n_q, args[1].shape[-2], dtype=torch.bool, device=q.device).tril()[n_q - m:]
        elif b.get("attn_mask") is not None:
            mask = bind(node.target, args, kwargs)["attn_mask"][..., n_q - m:, :]
        return aten.scaled_dot_product_attention(q, args[1], args[2], mask, scale=b.get("scale"))

    def _step_causal(self, node, args, kwargs, ctx, form):
        b = bind(node.target, node.args, node.kwargs)
        q, k, v = args[:3]
        info, w, d = ctx.info(node.args[0]), form.band, args[0].dim() - 2
        if w > 1:
            k = cat_frames(ctx.state(node, "k"), k, d)
            v = cat_frames(ctx.state(node, "v"), v, d)
            if ctx.mode == "step":
                ctx.set_state(node, "k", last_frames(k, d, w - 1))
                ctx.set_state(node, "v", last_frames(v, d, w - 1))
        mask = self._band_mask(ctx, info, q.shape[d], w, q.shape[0])
        mask = mask.view(mask.shape[0], *[1] * (q.dim() - 3), *mask.shape[1:])   # over heads
        return aten.scaled_dot_product_attention(q, k, v, mask, scale=b.get("scale"))

    @staticmethod
    def _band_mask(ctx, info, m: int, w: int, rows: int) -> torch.Tensor:
        """[rows, m, w-1+m]: query i of the chunk sees buffer positions i..i+w-1, except keys
        before the value's offline frame 0 (the zero state); its own key always, so that
        warm-up queries stay finite."""
        first = ctx.frames * info.rate.p // info.rate.q - (w - 1) - info.warmup   # of the buffer
        pos = first[:, None] + torch.arange(w - 1 + m, device=first.device)[None, :]
        keys = torch.arange(w - 1 + m, device=first.device)
        lag = (keys[:m, None] + (w - 1)) - keys[None, :]
        band = (lag >= 0) & (lag < w)
        mask = band[None] & ((pos >= 0)[:, None, :] | (lag == 0)[None])
        fold = rows // mask.shape[0]
        return mask if fold == 1 else mask.repeat_interleave(fold, 0)


def _count_cpu_attention() -> None:
    """torch's FLOP counter knows the GPU attention kernels only; count the CPU one the same way
    (so that `cocompile inspect` and the benchmarks see attention's FLOPs)."""
    from torch.utils import flop_counter as fc
    op = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None or op in fc.flop_registry or not hasattr(fc, "sdpa_flop_count"):
        return

    @fc.register_flop_formula(op)
    def _flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_flop_count(query_shape, key_shape, value_shape)


_count_cpu_attention()
