"""Choice: the step form of every temporal convolution (cocompile/ops/conv_forms.py), by measuring.

Invariant left behind: every convolution that steps along time has node.meta["cocompile.conv_form"]
= ConvForm(name, weight, how, ms), naming a form that applies to its step (window, fold or
partial; a transposed convolution's is always "overlap", overlap-add); where that form uses a
reshaped weight and the weight is a constant, the reshaped copy is a buffer of the graph module
(computed here once, not in every step). In a step of channels-last products only
(conv_forms.rows_step), every delay of a frame tensor is marked node.meta["cocompile.rows"]: it
keeps its frames as rows too (rows_delays). Runs after the step size is known and before
assign_states, because the form decides the state's shape.

The fastest form depends on the op's shapes and on the machine, so each applicable form is timed
on the op's real step shapes (one thread, a few repetitions, best of them) and the result is cached
on disk ($XDG_CACHE_HOME/cocompile/conv_forms, keyed by op, shapes, batch, dtype, torch version
and form). Where every conv has a channels-last product form and those forms' times add up to
within 15% of the fastest forms' (the TCN's dilated convs), every conv takes one: the step then
has no transposing copy between layers, which timing each conv alone does not see. COCOMPILE_CONV_FORM=window|fold|fold-mm|partial|partial-mm forces a form wherever it applies
(else its conv flavour, else window).

The shapes are those of a step of one stream unless COCOMPILE_FORM_BATCH=N asks for N streams:
the fastest form of a batched step is not always that of one stream (stride-1 ST-GCN: at one
stream the 256-channel temporal convs keep partial sums, whose state is read and rewritten in
full by each step; at 16 streams the window of inputs is faster, 7.9 against 10.3 ms per stream
in one interleaved run). The form decides the state's layout, so a compiled model has one form
per conv whatever batch it later steps: a deployment that steps many streams per call compiles
with the batch it serves.
"""
from __future__ import annotations

import hashlib
import json
import os
import time

import torch
from torch import fx

from cocompile.errors import CompileError
from cocompile.ops.conv_forms import (FORM_META, ROWS_FORMS, ROWS_META, ConvForm, applicable, fallback, fold,
                                      fold_rows, forced_form, from_rows, partial, partial_rows, prepare,
                                      rows_step, time_pointwise, to_rows)
from cocompile.ops.delay import delay_frames
from cocompile.ops.frames import meta_shape
from cocompile.ops.registry import rule_for
from cocompile.ops.upsample import TransposedConv
from cocompile.ops.window import Convolution, plan
from cocompile.passes.graph_edit import const
from cocompile.timeinfo import META, TimeInfo, reads_time

REPEATS, BUDGET_S = 3, 0.03        # timed runs per form: up to 3, stopping after 30 ms
BATCH_ENV = "COCOMPILE_FORM_BATCH"   # streams per step the forms are measured at (default 1)
OVERLAP = ConvForm("overlap", None, "only")   # a transposed conv's step (ops/upsample.py)
STEP_VERSION = 2                   # of the forms' step code: cached times of older code are stale
ROWS_SLACK = 1.15                  # channels-last forms everywhere when within 15% (see _rows_pay)


def choose_forms(gm: fx.GraphModule, consts: dict, step_frames: int) -> dict:
    """Record a form on every temporal convolution; returns {node name: ConvForm}."""
    force, chosen, measured = forced_form(), {}, {}
    for node in gm.graph.nodes:
        if _upsamples(node):              # one form: overlap-add (a channels-first conv, not rows)
            chosen[node.name] = OVERLAP
            continue
        site = _site(node, step_frames)
        if site is None:
            continue
        forms = applicable(site.geometry)
        if site.geometry.kernel == 1 and len(forms) == 1:   # one tap, no matrix product: as captured
            continue
        if force is not None:
            chosen[node.name] = (site, fallback(force, site.geometry), "forced", {})
        elif len(forms) == 1:
            chosen[node.name] = (site, "window", "only", {})
        else:
            ms, how = _measure(site, forms, consts)
            measured[node.name] = ms
            chosen[node.name] = (site, min(ms, key=ms.get), how, ms)
    if measured and _rows_pay(chosen, measured):
        for name, ms in measured.items():
            site, _, how, _ = chosen[name]
            chosen[name] = (site, min((f for f in ms if f in ROWS_FORMS + ("mm",)), key=ms.get), how, ms)
    for node in gm.graph.nodes:
        if node.name in chosen:
            entry = chosen[node.name]
            if entry is not OVERLAP:
                site, name, how, ms = entry
                entry = ConvForm(name, _store(gm, consts, site, name), how, ms)
            chosen[node.name] = node.meta[FORM_META] = entry
    return chosen


def _rows_pay(chosen: dict, measured: dict) -> bool:
    """Whether every convolution steps as a channels-last product when each may: each has such a
    form, and their measured times add up to at most ROWS_SLACK times those of the fastest forms.
    Each form is timed alone, from and to its own layout; a step whose convs all keep rows has no
    transposing copy between them (conv_forms.rows_step), which no single measurement sees."""
    rows = ROWS_FORMS + ("mm",)
    if any(e is OVERLAP or name not in measured for name, e in chosen.items()):
        return False
    if not all(any(f in rows for f in ms) for ms in measured.values()):
        return False
    best = sum(min(ms.values()) for ms in measured.values())
    as_rows = sum(min(v for f, v in ms.items() if f in rows) for ms in measured.values())
    return as_rows <= ROWS_SLACK * best


def rows_delays(gm: fx.GraphModule, chosen: dict) -> int:
    """In a channels-last step (conv_forms.rows_step) every delay of an (N, C, ..., T, ...) value
    keeps its frames as rows, (N, ..., T, C), like the convs' states: the frames it delays come
    from channels-last products and go to them, so the FIFO's update reads and writes them in
    their memory order, and an ONNX step has no transpose around it. Marks node.meta
    ["cocompile.rows"]; returns how many delays it marked. Runs before assign_states (the mark
    decides the state's shape)."""
    if not rows_step(f.name for f in chosen.values()):
        return 0
    count = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not delay_frames:
            continue
        x = node.args[0].meta.get(META)
        if isinstance(x, TimeInfo) and x.is_time and not x.merged and x.dim >= 2 and node.meta["val"].dim() >= 3:
            node.meta[ROWS_META] = True
            count += 1
    return count


class _Site:
    """One temporal convolution with its step geometry and conv arguments."""

    def __init__(self, node, rule: Convolution, x: TimeInfo, step_frames: int):
        self.node, self.rule, self.x = node, rule, x
        d = x.dim
        state = plan(rule.window(node, d), x.warmup).state
        self.geometry = rule.geometry(node, d, x.frames_per_step(step_frames), state)


def _site(node, step_frames: int) -> _Site | None:
    """The node as a temporal convolution, or None."""
    rule = rule_for(node.target) if node.op == "call_function" else None
    if not isinstance(rule, Convolution) or not reads_time(node) or rule.transposed(node):
        return None
    x = node.args[0].meta.get(META)
    if not isinstance(x, TimeInfo) or not x.is_time or x.merged or x.dim < 2:
        return None
    return _Site(node, rule, x, step_frames)


def _upsamples(node) -> bool:
    """Whether the node is a transposed convolution along time (ops/upsample.py)."""
    rule = rule_for(node.target) if node.op == "call_function" else None
    if not (isinstance(rule, TransposedConv) or (isinstance(rule, Convolution) and rule.transposed(node))):
        return False
    x = node.args[0].meta.get(META)
    return isinstance(x, TimeInfo) and x.is_time and x.dim >= 2


def _store(gm, consts, site: _Site, form: str) -> str | None:
    """Buffer name of the weight prepared for `form` (None: window, or a weight computed in-graph)."""
    weight = const(site.node.args[1], consts)
    if form == "window" or weight is None:
        return None
    name = f"cocompile_{form}_{site.node.name}"
    gm.register_buffer(name, prepare(form, weight.detach(), site.geometry))
    return name


# -- measuring ----------------------------------------------------------------------------------
def form_batch() -> int:
    """Streams per step the forms are measured at: COCOMPILE_FORM_BATCH, default 1."""
    value = os.environ.get(BATCH_ENV, "").strip()
    try:
        batch = int(value) if value else 1
    except ValueError:
        batch = 0
    if batch < 1:
        raise CompileError(f"{BATCH_ENV}={value!r} is not a number of streams",
                           hint="set it to the number of streams a step serves (e.g. 16), or unset it")
    return batch


def _measure(site: _Site, forms: list[str], consts: dict) -> tuple[dict, str]:
    """({form: ms per step}, "measured" or "cached"), from the cache where it has the entry."""
    runs = _Runs(site, consts, form_batch())
    ms, how = {}, "cached"
    for form in forms:
        path = _cache_path(_key(runs, form))
        ms[form] = _read(path)
        if ms[form] is None:
            ms[form], how = _time(runs.fn(form)), "measured"
            _write(path, ms[form])
    return ms, how


class _Runs:
    """Random inputs of the site's real step shapes (batch 1) and one step of each form on them."""

    def __init__(self, site: _Site, consts: dict, batch: int = 1):
        node, g, x_info = site.node, site.geometry, site.x
        self.site, gen = site, torch.Generator().manual_seed(0)
        val = node.args[0].meta["val"]

        def rand(shape):
            return torch.randn([int(s) for s in shape], generator=gen, dtype=val.dtype).to(val.device)

        self.batch = batch
        self.x = rand(meta_shape(node.args[0], batch, g.frames, x_info))
        self.window = rand(meta_shape(node.args[0], batch, max(g.state, 0), x_info))
        out = node.meta[META]
        self.sums = rand(meta_shape(node, batch, g.extent - 1, out)) if g.extent > 1 else None
        self.args = fx.node.map_arg(node.args, lambda n: const(n, consts) if const(n, consts) is not None
                                    else rand(meta_shape(n, batch)))
        self.a = site.rule.conv_args(node, self.args, {})

    def buf(self, window, x, t):
        """The frames a window-state form runs on: its state, then the chunk (as in the step)."""
        g = self.site.geometry
        return torch.cat([window, x], t) if g.state > 0 else x.narrow(t, -g.state, g.frames + g.state)

    def fn(self, form: str):
        """One step of `form` from the chunk and the state to the output frames."""
        g, a, rule, node = self.site.geometry, self.a, self.site.rule, self.site.node
        w, d, bias = prepare(form, a["weight"], g), g.d, a["bias"]
        if form == "fold-mm":
            window = to_rows(self.window, d).contiguous()
            return lambda: from_rows(fold_rows(self.buf(window, to_rows(self.x, d), -2), w, bias, g), d)
        if form == "partial-mm":
            sums = to_rows(self.sums, d).contiguous()
            return lambda: from_rows(partial_rows(to_rows(self.x, d), sums, w, bias, g, g.frames)[0], d)
        if form == "fold":
            return lambda: fold(self.buf(self.window, self.x, d), w, bias, a, g)
        if form == "partial":
            return lambda: partial(self.x, self.sums, w, bias, a, g, g.frames)
        if form == "mm":
            return lambda: time_pointwise(self.x, w, bias, a, d)
        return lambda: rule.run(node, self.args, self.buf(self.window, self.x, d), d)


def _finish() -> None:
    """Wait for the kernels a step queued (a CUDA step returns before it ran)."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _time(fn) -> float:
    """Best of a few runs, in ms, on one thread (the state's cat is part of every form's step)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            fn()                                     # first call: allocations, kernel choice
            best, spent = float("inf"), 0.0
            for _ in range(REPEATS):
                t0 = time.perf_counter()
                fn()
                _finish()
                dt = time.perf_counter() - t0
                best, spent = min(best, dt), spent + dt
                if spent > BUDGET_S:
                    break
    finally:
        torch.set_num_threads(threads)
    return best * 1e3


# -- cache ----------------------------------------------------------------------------------------
def cache_dir() -> str:
    """Where measured step times are kept: $XDG_CACHE_HOME/cocompile/conv_forms (~/.cache default)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "cocompile", "conv_forms")


def _key(runs: _Runs, form: str) -> dict:
    """What a step's time depends on: op, step shapes, conv arguments, dtype, torch, form."""
    a, node = runs.a, runs.site.node
    key = {"op": str(node.target), "x": list(runs.x.shape), "window": list(runs.window.shape),
           "w": list(a["weight"].shape), "bias": a["bias"] is not None, "stride": list(a["stride"]),
           "padding": list(a["padding"]), "dilation": list(a["dilation"]), "groups": int(a["groups"]),
           "geometry": repr(runs.site.geometry), "dtype": str(a["weight"].dtype),
           "torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability(), "threads": 1,
           "form": form, "step": STEP_VERSION}
    if a["weight"].device.type != "cpu":      # in the key off the CPU only (CPU entries stay valid)
        key["device"] = a["weight"].device.type
    if runs.batch != 1:                       # likewise: entries measured at batch 1 stay valid
        key["batch"] = runs.batch
    return key


def _cache_path(key: dict) -> str:
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    return os.path.join(cache_dir(), f"{digest}.json")


def _read(path: str) -> float | None:
    try:
        with open(path) as f:
            return float(json.load(f)["ms"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write(path: str, ms: float) -> None:
    """Atomic write (parallel compiles may measure the same op); a cache that cannot be written
    only costs a measurement next time."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump({"ms": ms}, f)
        os.replace(tmp, path)
    except OSError:
        pass
