"""Random temporal architectures for property tests: stacks and DAGs of conv/pool/transposed conv
along time.

A spec is plain data (so hypothesis can shrink it); `Net(spec)` builds the offline model. Time sits
on any spatial axis of a 1D/2D/3D layout; other spatial axes get 1 or 3 wide same-padded kernels.
With spec["batch_axis"] = b > 0 (`architectures(layouts=True)`) the model takes its input with
the batch on axis b (the (N, C, ...) layout with axis 0 moved there, e.g. time-major) and returns
its per-frame output in that layout too; `axes(spec)` gives the matching time_dim and batch_dim.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
UPCONV = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
MAXPOOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}
AVGPOOL = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}


def _per_axis(nd, t_axis, along_time, other):
    return tuple(along_time if i == t_axis else other for i in range(nd))


class Net(nn.Module):
    """Interprets a spec: ("conv", ...), ("pool", ...), ("up", ...) (transposed conv), ("relu",),
    ("bn",), ("pad", l, r), ("res", [layers]), ("down", stride, k), ("unet", padded) (down by 2, up
    by 2, added to its input), ("cat", [layers], [layers]); heads per spec["heads"]."""

    def __init__(self, spec):
        super().__init__()
        self.spec, self.nd, self.t = spec, spec["nd"], spec["t_axis"]
        self.mods = nn.ModuleDict()
        ch = self._build(spec["layers"], spec["in_ch"], "b")
        self.out_ch = ch
        self.fc = nn.Linear(ch, 3)

    def _build(self, layers, ch, prefix):
        for i, layer in enumerate(layers):
            name = f"{prefix}{i}"
            kind = layer[0]
            if kind == "conv":
                _, out, k, s, d, p, g, sk = layer
                g = g if ch % g == 0 and out % g == 0 else 1
                self.mods[name] = CONV[self.nd](
                    ch, out, _per_axis(self.nd, self.t, k, sk), _per_axis(self.nd, self.t, s, 1),
                    _per_axis(self.nd, self.t, p, sk // 2), _per_axis(self.nd, self.t, d, 1), groups=g)
                ch = out
            elif kind == "pool":
                _, avg, k, s, p, incl, ceil = layer
                kw = dict(count_include_pad=incl) if avg else {}
                self.mods[name] = (AVGPOOL if avg else MAXPOOL)[self.nd](
                    _per_axis(self.nd, self.t, k, 1), _per_axis(self.nd, self.t, s, 1),
                    _per_axis(self.nd, self.t, p, 0), ceil_mode=ceil, **kw)
            elif kind == "up":
                _, out, k, s, d, p, op, g, sk = layer
                g = g if ch % g == 0 and out % g == 0 else 1
                self.mods[name] = UPCONV[self.nd](
                    ch, out, _per_axis(self.nd, self.t, k, sk), _per_axis(self.nd, self.t, s, 1),
                    _per_axis(self.nd, self.t, p, sk // 2), _per_axis(self.nd, self.t, op, 0), groups=g,
                    dilation=_per_axis(self.nd, self.t, d, 1))
                ch = out
            elif kind == "unet":       # down then up by 2: the same length again for even lengths
                k, up = (3, 4) if layer[1] else (2, 2)
                self.mods[name + "_down"] = CONV[self.nd](
                    ch, ch, _per_axis(self.nd, self.t, k, 1), _per_axis(self.nd, self.t, 2, 1),
                    _per_axis(self.nd, self.t, (k - 1) // 2, 0))
                self.mods[name + "_up"] = UPCONV[self.nd](
                    ch, ch, _per_axis(self.nd, self.t, up, 1), _per_axis(self.nd, self.t, 2, 1),
                    _per_axis(self.nd, self.t, up // 2 - 1, 0))
            elif kind == "bn":
                bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[self.nd](ch)
                bn.running_mean.uniform_(-1, 1)
                bn.running_var.uniform_(0.5, 2)
                bn.weight.data.uniform_(0.5, 1.5)
                bn.bias.data.uniform_(-0.5, 0.5)
                self.mods[name] = bn
            elif kind == "res":
                self._build(layer[1], ch, name + "_")
            elif kind == "down":
                _, s, k = layer
                self.mods[name + "_main"] = CONV[self.nd](
                    ch, ch, _per_axis(self.nd, self.t, k, 1), _per_axis(self.nd, self.t, s, 1),
                    _per_axis(self.nd, self.t, k // 2, 0))
                self.mods[name + "_short"] = CONV[self.nd](ch, ch, 1, _per_axis(self.nd, self.t, s, 1))
            elif kind == "cat":
                a = self._build(layer[1], ch, name + "a")
                b = self._build(layer[2], ch, name + "b")
                ch = a + b
        return ch

    def _run(self, layers, x, prefix):
        for i, layer in enumerate(layers):
            name, kind = f"{prefix}{i}", layer[0]
            if kind in ("conv", "pool", "bn", "up"):
                x = self.mods[name](x)
            elif kind == "relu":
                x = F.relu(x)
            elif kind == "pad":
                pads = [0, 0] * self.nd
                j = self.nd - 1 - self.t
                pads[2 * j], pads[2 * j + 1] = layer[1], layer[2]
                x = F.pad(x, pads)
            elif kind == "res":
                x = x + self._run(layer[1], x, name + "_")
            elif kind == "down":
                x = self.mods[name + "_main"](x) + self.mods[name + "_short"](x)
            elif kind == "unet":
                x = x + self.mods[name + "_up"](F.relu(self.mods[name + "_down"](x)))
            elif kind == "cat":
                x = torch.cat([self._run(layer[1], x, name + "a"), self._run(layer[2], x, name + "b")], 1)
        return x

    def forward(self, x):
        b = self.spec.get("batch_axis", 0)
        y = self._run(self.spec["layers"], x.movedim(b, 0) if b else x, "b")
        td = 2 + self.t
        heads = self.spec["heads"]
        outs = []
        if "frames" in heads:
            outs.append(y.movedim(0, b) if b else y)
        if "mean" in heads:
            outs.append(y.mean(dim=td))
        if "amax" in heads:
            outs.append(y.amax(dim=tuple(range(2, y.dim()))))
        if "poolfc" in heads:      # a classifier head: adaptive pool to one value, flatten, Linear
            pool = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[self.nd]
            outs.append(self.fc(pool(y, 1).flatten(1)))
        return tuple(outs) if len(outs) > 1 else outs[0]


# -- strategies ------------------------------------------------------------------------------------
def _same_conv(draw, ch):
    """A length-preserving stride-1 conv (odd extent, centred or causal via explicit padding)."""
    k = draw(st.sampled_from([1, 3, 5]))
    d = draw(st.sampled_from([1, 2]))
    return [("conv", ch, k, 1, d, d * (k - 1) // 2, draw(st.sampled_from([1, ch])), draw(st.sampled_from([1, 3])))]


def _causal_conv(draw, ch):
    k = draw(st.integers(2, 3))
    d = draw(st.sampled_from([1, 2, 3]))
    return [("pad", d * (k - 1), 0), ("conv", ch, k, 1, d, 0, 1, 1)]


def _up(draw, ch, padded: bool):
    """A transposed conv; unpadded ones tile each frame's taps without overlap (E2 holds)."""
    s = draw(st.sampled_from([1, 2, 2, 3]))
    if not padded:
        return [("up", ch, s, s, 1, 0, 0, 1, 1)]
    k, d = draw(st.integers(1, 4)), draw(st.sampled_from([1, 2]))
    p, op = draw(st.integers(0, d * (k - 1) + 1)), draw(st.integers(0, max(s, d) - 1))
    out = draw(st.sampled_from([ch, ch + 1, 2 * ch]))
    return [("up", out, k, s, d, p, op, draw(st.sampled_from([1, 2, ch])), draw(st.sampled_from([1, 3])))]


@st.composite
def layer(draw, ch, padded: bool):
    kind = draw(st.sampled_from(["conv", "conv", "pool", "relu", "bn", "res", "down", "cat", "pad",
                                 "up", "unet"]))
    if kind == "conv":
        k, s, d = draw(st.integers(1, 4)), draw(st.sampled_from([1, 1, 2])), draw(st.sampled_from([1, 2]))
        ext = d * (k - 1) + 1
        p = draw(st.integers(0, ext)) if padded else 0
        out = draw(st.sampled_from([ch, ch + 1, 2 * ch]))
        return [("conv", out, k, s, d, p, draw(st.sampled_from([1, 2, ch])), draw(st.sampled_from([1, 3])))]
    if kind == "pool":
        k = draw(st.integers(1, 3))
        s = draw(st.integers(1, k))
        p = draw(st.integers(0, k // 2)) if padded else 0
        # ceil_mode's partial last window reads where the clip ends, like padding there: a model
        # with it does not claim sliding-window exactness, so only padded specs draw it
        ceil = draw(st.booleans()) if padded else False
        return [("pool", draw(st.booleans()), k, s, p, draw(st.booleans()), ceil)]
    if kind == "up":
        return _up(draw, ch, padded)
    if kind == "unet":
        return [("unet", padded)]
    if kind in ("relu", "bn"):
        return [(kind,)]
    if kind == "pad":
        return [("pad", draw(st.integers(1, 3)), draw(st.integers(0, 2)))] if padded else [("relu",)]
    if kind == "res":
        if not padded:      # unpadded residuals would change length: use a crop-free causal body
            return [("relu",)]
        body = draw(st.sampled_from(["same", "causal"]))
        inner = _same_conv(draw, ch) if body == "same" else _causal_conv(draw, ch)
        return [("res", inner + [("relu",)])]
    if kind == "down":
        return [("down", 2, draw(st.sampled_from([1, 3])) if padded else 1)]
    a = _same_conv(draw, 2) if padded else [("conv", 2, 1, 1, 1, 0, 1, 1)]
    b = [("pool", draw(st.booleans()), 3, 1, 1, True, False)] if padded else [("relu",)]
    return [("cat", a, b)]


def total_stride(layers) -> int:
    """Product of the downsampling strides (upsampling ignored): a multiple of every rate's
    denominator, so clips of a multiple of it step in whole frames."""
    out = 1
    for lay in layers:
        if lay[0] == "conv":
            out *= lay[3]
        elif lay[0] == "pool":
            out *= lay[3]
        elif lay[0] in ("down", "unet"):
            out *= 2 if lay[0] == "unet" else lay[1]
    return out


def out_channels(layers, ch):
    for lay in layers:
        if lay[0] in ("conv", "up"):
            ch = lay[1]
        elif lay[0] == "cat":
            ch = out_channels(lay[1], ch) + out_channels(lay[2], ch)
    return ch


def length_after(layers, t):
    """Offline frames after `layers` (None if some layer gets no frame)."""
    for lay in layers:
        kind = lay[0]
        if kind == "conv":
            _, _, k, s, d, p, _, _ = lay
            t = (t + 2 * p - d * (k - 1) - 1) // s + 1
        elif kind == "pool":
            _, _, k, s, p, _, ceil = lay
            n = -(-(t + 2 * p - k) // s) + 1 if ceil else (t + 2 * p - k) // s + 1
            t = n - 1 if ceil and (n - 1) * s >= t + p else n    # the last window starts in the clip
        elif kind == "up":
            _, _, k, s, d, p, op, _, _ = lay
            t = (t - 1) * s - 2 * p + d * (k - 1) + op + 1
        elif kind == "unet":
            t = t if t % 2 == 0 else None
        elif kind == "pad":
            t += lay[1] + lay[2]
        elif kind == "down":
            t = (t - 1) // lay[1] + 1
        elif kind == "res":
            if length_after(lay[1], t) != t:
                return None
        if t is None or t < 1:
            return None
    return t


@st.composite
def architectures(draw, layouts: bool = False):
    """A random spec with its clip length; padded or not (unpadded ones must also meet E2). With
    `layouts`, the batch may sit on another axis of the input (spec["batch_axis"])."""
    nd = draw(st.integers(1, 3))
    padded = draw(st.booleans())
    spec = {"nd": nd, "t_axis": draw(st.integers(0, nd - 1)), "in_ch": draw(st.integers(1, 3)),
            "batch_axis": draw(st.sampled_from([0, 1, nd + 1])) if layouts else 0,
            "layers": [], "heads": draw(st.sampled_from([("frames",), ("mean",), ("frames", "mean"),
                                                          ("amax",), ("frames", "amax"),
                                                          ("poolfc",), ("frames", "poolfc")]))}
    ch = spec["in_ch"]
    for _ in range(draw(st.integers(1, 5))):
        new = draw(layer(ch, padded))
        spec["layers"] += new
        ch = out_channels(new, ch)
    stride = total_stride(spec["layers"])
    # clips of 2-6 strides' worth; and of one stride's worth, which leaves a single frame (the
    # time axis cannot be told from other axes of size 1 there: the compiler must still be exact)
    fits = [stride * m for m in (2, 3, 4, 6) if 8 <= stride * m <= 48
            and length_after(spec["layers"], stride * m) is not None]
    if stride >= 2 and length_after(spec["layers"], stride) == 1:
        fits.append(stride)
    if not fits:
        spec["layers"], fits = [("relu",)], [8]
    return spec, padded, draw(st.sampled_from(fits))


def model_and_clip(spec: dict, T: int):
    """The eval model of `spec` and a random batch of two clips of T frames for it (the batch on
    axis spec["batch_axis"])."""
    torch.manual_seed(0)
    model = Net(spec).eval()
    shape = [2, spec["in_ch"]] + [3] * spec["nd"]
    shape[2 + spec["t_axis"]] = T
    return model, torch.randn(shape).movedim(0, spec.get("batch_axis", 0)).contiguous()


def axes(spec: dict) -> tuple[int, int]:
    """(time_dim, batch_dim) of the input of Net(spec)."""
    b, t = spec.get("batch_axis", 0), 2 + spec["t_axis"]
    return (t - 1 if 0 < t <= b else t), b


def one_stream(spec: dict, clip):
    """The first stream of a clip of model_and_clip."""
    return clip.narrow(spec.get("batch_axis", 0), 0, 1)
