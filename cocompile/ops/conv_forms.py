"""Step forms of a temporal convolution: several ways to compute the same output frames.

A convolution along time (kernel k, dilation dd, extent e = dd*(k-1)+1, stride s) reads n new
input frames per step. How its step is computed decides the speed (on oneDNN with one thread a
3x3x3 conv3d over a thin 3-frame window runs ~3x slower per frame than on a whole clip):

  window   keep S input frames, run the conv with no temporal padding on [state | chunk]
           (WindowRule's form, shared with pooling; any stride).
  fold     one output frame per step (n == s): the k taps of that frame's window, (N, Cin, k, ...),
           are read as the channels of a conv with one axis less, (N, Cin*k, ...), whose weight is
           the kernel viewed as (Cout, Cin/g*k, ...). Channel ci*k + tap: the taps of an input
           channel are adjacent, so each group's Cin/g*k channels stay contiguous (groups work).
           Same state as `window`.
  partial  stride 1: the new frames are convolved once with the k taps stacked in the output
           channels, weight (g, k, Cout/g) x (Cin/g, 1, ...). The state keeps the e-1 output
           frames still waiting for contributions (partial sums, no bias); each step adds the new
           contributions and emits the frames that became complete (+ bias). Zero partial sums
           are the zero input state, i.e. the start padding.
  *-mm     fold and partial of a conv whose kernel is 1 on every other axis (a pure temporal
           kernel, groups 1): the conv over channels is a matrix product, run as a channels-last
           linear (faster where few positions share a large channel product, e.g. ST-GCN). Their
           state is kept as rows, (N, *other axes, frames, C): the taps of a position are then one
           contiguous row (fold-mm's weight is tap-major, tap*Cin + ci) and the state update a cat
           along the frames, with no transposing copy of the window in each step.
  mm       a conv with kernel 1 on every axis, time included (ST-GCN's 1x1 graph convs): one
           channels-last matrix product over the rows of the new frames.

All of them compute the same sums in a different order (float rounding only), with plain ATen ops
that torch.export, ONNX and TorchScript take as they are.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import CompileError

aten = torch.ops.aten

FORM_META = "cocompile.conv_form"        # node.meta key of a convolution's ConvForm
FORMS = ("window", "fold", "fold-mm", "partial", "partial-mm", "mm")
ROWS_FORMS = ("fold-mm", "partial-mm")   # state kept as rows (see the module docstring)
FORCE_ENV = "COCOMPILE_CONV_FORM"        # one of FORMS: use that form wherever it applies
ROWS_META = "cocompile.rows"             # node.meta key: True where a delay keeps its frames as rows


@dataclass(frozen=True)
class ConvForm:
    """The step form chosen for one convolution node, and why.

    weight: attribute of the graph module holding the weight prepared for the form (computed once
    at compile time), or None (the form reshapes the captured weight in the step).
    ms: measured milliseconds per step of each applicable form ({} when forced or alone).
    """

    name: str = "window"
    weight: str | None = None
    how: str = "default"                 # forced | measured | cached | only
    ms: dict = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class ConvGeometry:
    """A convolution along time as one step sees it. `d` is the time axis (of input and output),
    `frames` the input frames per step, `state` the input frames the window form keeps."""

    d: int
    kernel: int
    dilation: int
    stride: int
    groups: int
    cin: int
    cout: int
    frames: int
    state: int
    pointwise: bool = False      # kernel 1, stride 1, no padding on every other axis; groups 1
    padding: int = 0             # along time

    @property
    def extent(self) -> int:
        return self.dilation * (self.kernel - 1) + 1


def forced_form() -> tuple[str, ...] | None:
    """The forms COCOMPILE_CONV_FORM asks for (a comma-separated list: each conv takes the first
    that applies), or None (measure)."""
    value = os.environ.get(FORCE_ENV, "").strip().lower()
    if value in ("", "auto"):
        return None
    forms = tuple(f.strip() for f in value.split(","))
    wrong = [f for f in forms if f not in FORMS]
    if wrong:
        raise CompileError(f"{FORCE_ENV}={value!r}: {', '.join(map(repr, wrong))} names no convolution "
                           "step form", hint=f"set it to one of {', '.join(FORMS)} (or a comma-separated "
                           "list of them), or unset it to measure")
    return forms


def rows_step(forms) -> bool:
    """Whether a step whose convolutions run `forms` is channels-last throughout: every conv a
    channels-last product, some keeping their state as rows (ST-GCN: 1x1 graph convs and temporal
    convs). Such a step keeps its delays' frames as rows too, and its ONNX form stays channels-last
    (cocompile.export.onnx_portable)."""
    forms = list(forms)
    return any(f in ROWS_FORMS for f in forms) and all(f in ROWS_FORMS + ("mm",) for f in forms)


def why_not(form: str, g: ConvGeometry) -> str | None:
    """Why `form` cannot run this convolution's step (None: it can)."""
    if form == "fold" and (g.kernel == 1 or g.frames != g.stride):
        return f"fold needs a temporal kernel > 1 and one output frame per step (gets {g.frames} " \
               f"frames, stride {g.stride})"
    if form == "partial" and (g.stride != 1 or g.extent == 1):
        return f"partial sums need temporal stride 1 and extent > 1 (stride {g.stride}, " \
               f"extent {g.extent})"
    if form == "mm":
        if not (g.pointwise and g.kernel == 1 and g.stride == 1 and g.padding == 0):
            return "a matrix product needs kernel 1, stride 1 and no padding on every axis, and groups 1"
        return None
    if g.kernel == 1:
        return f"{form} needs a temporal kernel > 1"
    if form.endswith("-mm"):
        if not g.pointwise:
            return "a matrix product needs kernel 1, stride 1 and no padding on every axis but " \
                   "time, and groups 1"
        return why_not(form.removesuffix("-mm"), g)
    return None


def applicable(g: ConvGeometry) -> list[str]:
    """The forms that can run this convolution's step; `window` always can."""
    return ["window"] + [f for f in FORMS[1:] if why_not(f, g) is None]


def fallback(forms: tuple[str, ...], g: ConvGeometry) -> str:
    """The form forced `forms` become here: the first that applies, else the first one's conv
    flavour, else window."""
    for f in (*forms, forms[0].removesuffix("-mm")):
        if why_not(f, g) is None:
            return f
    return "window"


# -- weights ------------------------------------------------------------------------------------
def prepare(form: str, weight: torch.Tensor, g: ConvGeometry) -> torch.Tensor:
    """The weight as `form` uses it (computed once per compile when the weight is constant).

    fold:    (Cout, Cin/g*k, *other kernel axes), channel ci*k + tap.
    partial: (g*k*Cout/g, Cin/g, *other kernel axes), output channel (group, position, o):
             position i holds tap k-1-i (see contributions()).
    Both keep a time axis of kernel 1 at d where the step needs one (conv1d, several frames per
    step); the -mm flavours are the same matrices flattened to 2-D, for a matrix product, except
    that fold-mm orders its columns tap-major (tap*Cin + ci), as the rows of its state lie; mm is
    the (Cout, Cin) matrix of a kernel that is 1 everywhere.
    """
    base = form.removesuffix("-mm")
    if form == "mm":
        return weight.flatten(1).contiguous()
    if form == "fold-mm":
        return weight.movedim(g.d, 1).flatten(1).contiguous()
    if base == "fold":
        w = weight.movedim(g.d, 2).flatten(1, 2)
        time_axis = w.dim() == 2                     # conv1d: the folded frame keeps its axis
    elif base == "partial":
        w = weight.unflatten(0, (g.groups, g.cout // g.groups))       # time now on axis d+1
        w = w.flip(g.d + 1).movedim(g.d + 1, 1).flatten(0, 2)         # (g*k*Cout/g, Cin/g, ...)
        time_axis = g.frames != 1 or w.dim() == 2
    else:
        return weight
    if form.endswith("-mm"):
        return w.flatten(1).contiguous()
    return (w.unsqueeze(g.d) if time_axis else w).contiguous()


# -- the forms ----------------------------------------------------------------------------------
def time_pointwise(x: torch.Tensor, w: torch.Tensor, bias, a: dict, d: int) -> torch.Tensor:
    """The convolution `a` (conv args) of `x` with a weight of temporal kernel 1, at stride 1
    along time: w 2-D is a matrix product over channels; w without a time axis needs one frame
    (a conv with one axis less, which oneDNN runs faster than a conv over a length-1 axis)."""
    if w.dim() == 2:                                 # kernel 1 everywhere: channels-last matmul
        rows = to_rows(x, d)
        # as one 2-D product: linear on a strided N-D input would broadcast (copy) the weight
        y = aten.linear(rows.reshape(-1, rows.shape[-1]), w, bias)
        return from_rows(y.view(*rows.shape[:-1], w.shape[0]), d)
    nd, j = x.dim() - 2, d - 2
    if w.dim() == x.dim():
        return aten.convolution.default(x, w, bias, _set(a["stride"], j, 1, nd), _set(a["padding"], j, 0, nd),
                                        _set(a["dilation"], j, 1, nd), False, [0] * nd, a["groups"])
    if x.shape[d] != 1:                              # (the flush may bring several frames)
        return time_pointwise(x, w.unsqueeze(d), bias, a, d)
    y = aten.convolution.default(x.squeeze(d), w, bias, _drop(a["stride"], j, nd), _drop(a["padding"], j, nd),
                                 _drop(a["dilation"], j, nd), False, [0] * (nd - 1), a["groups"])
    return y.unsqueeze(d)


def channels_first_mm(x: torch.Tensor, w: torch.Tensor, bias) -> torch.Tensor:
    """x (N, Cin, *positions) through a kernel-1 conv of matrix w (Cout, Cin) as one broadcasting
    matrix product over the flattened positions: no axis moves (for runtimes that copy on every
    transpose)."""
    y = torch.matmul(w, x.reshape(x.shape[0], x.shape[1], -1))
    if bias is not None:
        y = y + bias[:, None]
    return y.view(x.shape[0], w.shape[0], *x.shape[2:])


def fold(buf: torch.Tensor, wf: torch.Tensor, bias, a: dict, g: ConvGeometry) -> torch.Tensor:
    """The one output frame of a window starting at buf's first frame, as a conv over the taps
    folded into channels (wf = prepare("fold" or "fold-mm", weight))."""
    taps = buf.narrow(g.d, 0, g.extent)
    if g.dilation > 1:                               # every dd-th frame is a tap
        taps = aten.slice.Tensor(taps, g.d, 0, g.extent, g.dilation)
    if wf.dim() == 2:                                # fold-mm: tap-major, channel tap*Cin + ci
        x = taps.movedim(g.d, 1).flatten(1, 2).unsqueeze(g.d)
    else:                                            # (N, Cin*k, ..1..): channel ci*k + tap
        x = taps.movedim(g.d, 2).flatten(1, 2).unsqueeze(g.d)
    return time_pointwise(x, wf, bias, a, g.d)


def tap_outputs(x: torch.Tensor, wp: torch.Tensor, a: dict, g: ConvGeometry) -> torch.Tensor:
    """Every tap applied to every new frame: (N, g, k, Cout/g, ..., n along d+2, ...), position i
    holding tap k-1-i (wp = prepare("partial" or "partial-mm", weight))."""
    z = time_pointwise(x, wp, None, a, g.d)
    return z.unflatten(1, (g.groups, g.kernel, g.cout // g.groups))


def _drop(values, j: int, n: int) -> list:
    """An int-list conv argument (length 1 or n) without its entry j."""
    vals = list(values) if len(values) > 1 else list(values) * n
    return vals[:j] + vals[j + 1:]


def contributions(z: torch.Tensor, g: ConvGeometry) -> torch.Tensor:
    """The tap outputs laid out by the output frame they belong to: (N, g, Cout/g, ..., e-1+n
    along d+1, ...). With the buffer [e-1 pending | n new], new frame q reaches output m through
    tap j iff m = e-1+q - j*dd, i.e. position i*dd + q for i = k-1-j."""
    return _by_output_frame(z.movedim(2, g.d + 1), g.d + 1, g)


def _by_output_frame(c: torch.Tensor, t: int, g: ConvGeometry) -> torch.Tensor:
    """Tap outputs c with position i on axis t and new frame q on t+1, summed into the e-1+n
    output frames they reach (on axis t; see contributions())."""
    n, dd, k = c.shape[t + 1], g.dilation, g.kernel
    length = (k - 1) * dd + n
    if n <= dd:
        # positions i*dd+q never collide: pad each tap's frames to dd and lay them end to end
        if n < dd:
            c = _pad_axis(c, t + 1, 0, dd - n)
        return c.flatten(t, t + 1).narrow(t, 0, length)
    out = None                                       # frames of different taps collide: add
    for i in range(k):
        term = _pad_axis(c.select(t, i), t, i * dd, length - i * dd - n)
        out = term if out is None else out + term
    return out


def partial(x: torch.Tensor, sums: torch.Tensor, wp: torch.Tensor, bias, a: dict, g: ConvGeometry,
            emit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the first `emit` output frames, the partial sums left) after adding the contributions of
    the new frames `x` to the e-1 pending partial sums `sums`; frames past the data (the flush's
    end padding) contribute nothing."""
    t, pending = g.d + 1, g.extent - 1
    full = sums.unflatten(1, (g.groups, g.cout // g.groups))          # time on axis d+1
    if x.shape[g.d]:
        c = contributions(tap_outputs(x, wp, a, g), g)
        full = torch.cat([full + c.narrow(t, 0, pending), c.narrow(t, pending, c.shape[t] - pending)], t)
    if full.shape[t] < emit:                         # outputs made of end padding only
        full = _pad_axis(full, t, 0, emit - full.shape[t])
    out = full.narrow(t, 0, emit).flatten(1, 2)
    if bias is not None:
        out = out + bias.view([1, -1] + [1] * (out.dim() - 2))
    return out, full.narrow(t, emit, full.shape[t] - emit).flatten(1, 2)


# -- rows: the -mm forms' layout, (N, *other axes, frames, C) ------------------------------------
def _rows_order(n: int, d: int) -> list[int]:
    """The axes of an n-D value in rows order: batch, the other axes, time d, channels 1."""
    return [0] + [a for a in range(2, n) if a != d] + [d, 1]


def to_rows(x: torch.Tensor, d: int) -> torch.Tensor:
    """(N, C, ..., frames at d, ...) -> (N, *other axes, frames, C): a view (one permute)."""
    return x.permute(_rows_order(x.dim(), d))


def from_rows(r: torch.Tensor, d: int) -> torch.Tensor:
    """Inverse of to_rows: a channels-last view, no copy."""
    order = _rows_order(r.dim(), d)
    return r.permute([order.index(a) for a in range(r.dim())])


def rows_shape(shape, d: int) -> tuple:
    """to_rows applied to a shape."""
    return tuple(shape[a] for a in _rows_order(len(shape), d))


def fold_rows(buf: torch.Tensor, wf: torch.Tensor, bias, g: ConvGeometry) -> torch.Tensor:
    """fold-mm on rows: the one output frame (rows, 1 frame) of a window starting at buf's first
    frame; each position's taps are one row of k*Cin values (wf = prepare("fold-mm", weight))."""
    taps = buf.narrow(-2, 0, g.extent)
    if g.dilation > 1:
        taps = aten.slice.Tensor(taps, taps.dim() - 2, 0, g.extent, g.dilation)
    y = aten.linear(taps.reshape(-1, g.kernel * g.cin), wf, bias)
    return y.view(*taps.shape[:-2], 1, g.cout)


def partial_rows(x: torch.Tensor, sums: torch.Tensor, wp: torch.Tensor, bias, g: ConvGeometry,
                 emit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """partial-mm on rows: x (rows, n frames, Cin), sums (rows, e-1 frames, Cout); as partial()."""
    t, pending = sums.dim() - 2, g.extent - 1
    full = sums
    if x.shape[-2]:
        z = aten.linear(x.reshape(-1, g.cin), wp).view(*x.shape[:-1], g.kernel, g.cout)
        c = _by_output_frame(z.movedim(-2, -3), t, g)          # position i on t, frame q on t+1
        full = torch.cat([full + c.narrow(t, 0, pending), c.narrow(t, pending, c.shape[t] - pending)], t)
    if full.shape[t] < emit:
        full = _pad_axis(full, t, 0, emit - full.shape[t])
    out = full.narrow(t, 0, emit)
    if bias is not None:
        out = out + bias
    return out, full.narrow(t, emit, full.shape[t] - emit)


def _pad_axis(x: torch.Tensor, axis: int, before: int, after: int) -> torch.Tensor:
    """Zero frames before/after along one axis."""
    return F.pad(x, [0, 0] * (x.dim() - 1 - axis) + [before, after])


def _set(values, j: int, v, n: int) -> list:
    """Copy of an int-list conv argument (length 1 or n) with entry j set to v."""
    vals = list(values) if len(values) > 1 else list(values) * n
    vals[j] = v
    return vals


def form_of(node) -> ConvForm:
    """The step form chosen for a convolution node (window until passes/choose_forms runs)."""
    return node.meta.get(FORM_META, WINDOW)


WINDOW = ConvForm()
