"""Step forms of temporal convolutions (cocompile/ops/conv_forms.py, passes/choose_forms.py).

Oracles: aten.convolution itself for the algebra of each form; the untouched offline model for
whole networks (E1, and E2 where there is no zero padding), with every form forced in turn through
COCOMPILE_CONV_FORM; the eager continual model for the ONNX artifact (E4).
"""
from __future__ import annotations

import itertools
import json
import os

import onnx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import cocompile
from archs import architectures, model_and_clip
from cocompile.ops.conv_forms import (FORCE_ENV, FORM_META, FORMS, ROWS_FORMS, ConvGeometry, channels_first_mm, fold, fold_rows,
                                     from_rows, partial, partial_rows, prepare, time_pointwise, to_rows)
from cocompile.ops.linalg import einsum_by_batched_matmul, einsum_by_matmul
from cocompile.passes.choose_forms import cache_dir
from test_export import e4

# per forced form; the measured-form suite (test_properties.py) runs the full count
EXAMPLES = max(8, int(os.environ.get("COCOMPILE_PROPERTY_EXAMPLES", "200")) // 25)
aten = torch.ops.aten


@pytest.fixture(params=FORMS)
def form(request, monkeypatch):
    """Every temporal conv of the models compiled in the test steps in this form where it applies."""
    monkeypatch.setenv(FORCE_ENV, request.param)
    return request.param


def conv_forms_of(co) -> dict:
    return {n.name: n.meta[FORM_META] for n in co.program.gm.graph.nodes if FORM_META in n.meta}


# -- the algebra of one conv, against aten.convolution ---------------------------------------------
def _conv(x, w, b, nd, d, dil, groups, other):
    """aten.convolution with stride 1, padding other//2 on every axis but time."""
    pad, dils = [other // 2] * nd, [1] * nd
    pad[d - 2], dils[d - 2] = 0, dil
    a = dict(stride=[1] * nd, padding=pad, dilation=dils, groups=groups)
    return aten.convolution(x, w, b, [1] * nd, pad, dils, False, [0] * nd, groups), a


def _cases(nd, pointwise):
    """(time axis, kernel, dilation, groups, frames per step, form flavour)."""
    groups, mm = ((1,), "-mm") if pointwise else ((1, 2, 4), "")
    return itertools.product(range(2, 2 + nd), (2, 3), (1, 2, 3), groups, (1, 2, 3, 5), ("", mm))


@pytest.mark.parametrize("pointwise", [False, True])
@pytest.mark.parametrize("nd", [1, 2, 3])
def test_fold_and_partial_compute_the_convolution(nd, pointwise):
    """fold: the first output frame of a window; partial: a stream fed n frames at a time from zero
    partial sums, then flushed, equals the conv of the zero-padded signal (float64, exact)."""
    torch.manual_seed(0)
    other = 1 if pointwise else 3
    for d, k, dil, groups, n, flavour in _cases(nd, pointwise):
        cin, cout, e, T = 4, 8, dil * (k - 1) + 1, 12 * n
        shape, kernel = [2, cin] + [4] * nd, [cout, cin // groups] + [other] * nd
        shape[d], kernel[d] = T, k
        x, w, b = torch.randn(shape).double(), torch.randn(kernel).double(), torch.randn(cout).double()
        g = ConvGeometry(d, k, dil, 1, groups, cin, cout, n, e - 1, pointwise)
        ref, a = _conv(x, w, b, nd, d, dil, groups, other)
        got = fold(x.narrow(d, 0, e), prepare("fold" + flavour, w, g), b, a, g)
        torch.testing.assert_close(got, ref.narrow(d, 0, 1), rtol=0, atol=1e-10)
        # partial sums: e-1 zero frames of start padding, the stream, then e-1 frames of flush
        zeros = x.new_zeros(*x.shape[:d], e - 1, *x.shape[d + 1:])
        ref, _ = _conv(torch.cat([zeros, x, zeros], d), w, b, nd, d, dil, groups, other)
        wp, sums, outs = prepare("partial" + flavour, w, g), torch.zeros_like(ref.narrow(d, 0, e - 1)), []
        for t in range(0, T, n):
            y, sums = partial(x.narrow(d, t, n), sums, wp, b, a, g, n)
            outs.append(y)
        outs.append(partial(x.narrow(d, 0, 0), sums, wp, b, a, g, e - 1)[0])
        torch.testing.assert_close(torch.cat(outs, d), ref, rtol=0, atol=1e-10)
        if flavour:                      # the -mm forms' steps, on their state of rows
            wf, rows = prepare("fold-mm", w, g), to_rows(x, d)
            got = from_rows(fold_rows(rows.narrow(-2, 0, e), wf, b, g), d)
            torch.testing.assert_close(got, _conv(x, w, b, nd, d, dil, groups, other)[0].narrow(d, 0, 1),
                                       rtol=0, atol=1e-10)
            sums, outs = to_rows(torch.zeros_like(ref.narrow(d, 0, e - 1)), d), []
            for t in range(0, T, n):
                y, sums = partial_rows(rows.narrow(-2, t, n), sums, wp, b, g, n)
                outs.append(from_rows(y, d))
            outs.append(from_rows(partial_rows(rows.narrow(-2, 0, 0), sums, wp, b, g, e - 1)[0], d))
            torch.testing.assert_close(torch.cat(outs, d), ref, rtol=0, atol=1e-10)


def test_a_kernel_of_ones_is_one_matrix_product():
    """mm: a conv whose kernel is 1 on every axis, over a chunk of frames, as one product."""
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 6, 3, 4, 5).double(), torch.randn(7, 6, 1, 1, 1).double(), torch.randn(7).double()
    g = ConvGeometry(2, 1, 1, 1, 1, 6, 7, 3, 0, True)
    a = dict(stride=[1] * 3, padding=[0] * 3, dilation=[1] * 3, groups=1)
    got = time_pointwise(x, prepare("mm", w, g), b, a, 2)
    torch.testing.assert_close(got, aten.convolution(x, w, b, [1] * 3, [0] * 3, [1] * 3, False, [0] * 3, 1),
                               rtol=0, atol=1e-10)


# -- whole networks, every form forced ---------------------------------------------------------
@settings(max_examples=EXAMPLES, deadline=None, derandomize=bool(os.environ.get("CI")),
          suppress_health_check=list(HealthCheck), print_blob=True)
@given(architectures(), st.sampled_from([1, 2]))
def test_random_architectures_are_exact_in_every_form(form, arch, multiple):
    spec, padded, T = arch
    model, clip = model_and_clip(spec, T)
    co = cocompile.compile(model, clip[:1], time_dim=2 + spec["t_axis"], trace=False)
    if multiple > 1 and T % (2 * co.step_frames) == 0:      # more frames per step: n > 1 paths
        co = cocompile.compile(model, clip[:1], time_dim=2 + spec["t_axis"], trace=False,
                               step_frames=2 * co.step_frames)
    report = cocompile.verify(model, co, clip)
    assert report.passed, f"{form} {spec}\n{report}"
    assert all(c.claimed for c in report.checks if c.name == "E1")
    e2 = [c for c in report.checks if c.name == "E2"]
    if not padded and e2:
        assert all(c.claimed and c.ok for c in e2), f"{form} {spec}\n{report}"


class Stack(nn.Module):
    """Time on axis `t` of a 3D layout: padded, strided, dilated, grouped convs and a residual."""

    def __init__(self, t: int = 2):
        super().__init__()

        def ax(along_time, other):
            return tuple(along_time if i == t - 2 else other for i in range(3))

        self.a = nn.Conv3d(3, 8, ax(3, 3), padding=ax(1, 1))
        self.b = nn.Conv3d(8, 8, ax(3, 1), padding=ax(2, 0), dilation=ax(2, 1), groups=4)
        self.c = nn.Conv3d(8, 8, ax(2, 3), stride=ax(2, 1), padding=ax(0, 1))
        self.d = nn.Conv3d(8, 8, ax(3, 3), padding=ax(1, 1), groups=8)
        self.e = nn.Conv3d(8, 8, ax(3, 1), padding=ax(1, 0))       # pure temporal kernel
        self.f = nn.Conv3d(8, 4, 1)                                 # kernel 1 everywhere

    def forward(self, x):
        h = torch.relu(self.a(x))
        h = h + self.b(h)
        h = torch.relu(self.c(h))
        return self.f(self.e(torch.relu(h + self.d(h))))


@pytest.mark.parametrize("t", [2, 3, 4])
def test_conv_stack_is_exact_and_uses_the_form(form, t):
    torch.manual_seed(0)
    model = Stack(t).eval()
    shape = [2, 3, 6, 6, 6]
    shape[t] = 16
    clip = torch.randn(shape)
    co = cocompile.compile(model, clip[:1], time_dim=t, trace=False)
    report = cocompile.verify(model, co, clip)
    assert report.passed, f"{form}\n{report}"
    forms = conv_forms_of(co)
    assert len(forms) == 6 and all(f.how == "forced" for f in forms.values())
    # step_frames 2 (stride 2 in c): two frames reach a, b; one frame (its stride) reaches c, d, e;
    # only e is a matrix product over channels (-mm), and f one over channels alone (mm)
    expected = {"window": ["window"] * 6, "fold": ["window", "window", "fold", "fold", "fold", "window"],
                "fold-mm": ["window", "window", "fold", "fold", "fold-mm", "window"],
                "partial": ["partial", "partial", "window", "partial", "partial", "window"],
                "partial-mm": ["partial", "partial", "window", "partial", "partial-mm", "window"],
                "mm": ["window"] * 5 + ["mm"]}[form]
    assert [f.name for f in forms.values()] == expected
    # partial sums: the state holds output frames (e-1 of them), the window form input frames
    spec = next(s for s in co.specs if s.name == "state.a")
    assert spec.shape[t - 1] == 2 and spec.shape[0] == (8 if form.startswith("partial") else 3)


class Persons(nn.Module):
    """(N, C, T, V, M) with the M persons folded into the batch, as ST-GCN does: the state keeps
    them as an axis of its own (StateSpec.fold) in every form."""

    def __init__(self):
        super().__init__()
        self.tcn = nn.Conv2d(3, 6, (5, 1), padding=(2, 0))
        self.out = nn.Conv2d(6, 4, (3, 1), dilation=(2, 1))

    def forward(self, x):
        N, C, T, V, M = x.shape
        x = x.permute(0, 4, 1, 2, 3).reshape(N * M, C, T, V)
        y = self.out(torch.relu(self.tcn(x)))
        return y.view(N, M, *y.shape[1:]).mean(1)


def test_persons_folded_into_the_batch(form):
    torch.manual_seed(0)
    model, clip = Persons().eval(), torch.randn(2, 3, 12, 5, 2)
    co = cocompile.compile(model, clip[:1], time_dim=2, trace=False)
    report = cocompile.verify(model, co, clip)
    assert report.passed, f"{form}\n{report}"
    assert all(s.fold == 2 for s in co.specs[1:]) and len(co.specs) == 3


def test_onnx_artifact_reproduces_every_form(form, tmp_path):
    """E4 in onnxruntime, and the artifact's convs and matrix products read their weights as
    initializers (prepared once, no reshape of a parameter in every step)."""
    torch.manual_seed(0)
    model = Stack().eval()
    co = cocompile.compile(model, torch.randn(1, 3, 8, 6, 6), time_dim=2)
    path = str(co.export(tmp_path / "co.onnx"))
    assert e4(co, path) <= 1e-5
    graph = onnx.load(path).graph
    inits = {i.name for i in graph.initializer}
    products = [n for n in graph.node if n.op_type in ("Conv", "MatMul", "Gemm")]
    assert len(products) == 6 and all(inits & set(n.input) for n in products)
    if form == "window":
        assert all(n.op_type == "Conv" for n in products)
    if form == "mm":     # ONNX steps are portable: a kernel of ones is W @ x on channels-first, no Transpose
        assert sum(n.op_type == "MatMul" and n.input[0] in inits for n in products) == 1
        assert not any(n.op_type == "Transpose" for n in graph.node)


# -- the choice ------------------------------------------------------------------------------
def test_forms_are_measured_cached_and_reported(monkeypatch, tmp_path):
    monkeypatch.delenv(FORCE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    torch.manual_seed(0)
    model, clip = Stack().eval(), torch.randn(1, 3, 8, 6, 6)
    first = conv_forms_of(cocompile.compile(model, clip, time_dim=2, trace=False))
    assert cache_dir() == str(tmp_path / "cocompile" / "conv_forms")
    entries = sorted(os.listdir(cache_dir()))
    assert len(entries) == sum(len(f.ms) for f in first.values()) > 0
    assert all(json.load(open(os.path.join(cache_dir(), e)))["ms"] > 0 for e in entries)
    rows = all(f.name in ROWS_FORMS + ("mm",) for f in first.values())
    for f in first.values():
        assert f.how in ("measured", "only")
        if f.ms:      # the fastest measured form is the one used (the fastest rows form in a rows step)
            mine = {k: v for k, v in f.ms.items() if not rows or k in ROWS_FORMS + ("mm",)}
            assert "window" in f.ms and f.name == min(mine, key=mine.get)
    co = cocompile.compile(model, clip, time_dim=2, trace=False)
    again = conv_forms_of(co)
    assert {k: (f.name, f.ms) for k, f in again.items()} == {k: (f.name, f.ms) for k, f in first.items()}
    assert all(f.how in ("cached", "only") for f in again.values())
    table = str(cocompile.inspect(co))
    assert "form" in table.splitlines()[0]
    for f in again.values():
        assert f.name in table


class Dilated(nn.Module):
    """Two causal dilated conv1d: each may step as a channels-last product (fold-mm) or not."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv1d(4, 8, 3, dilation=2), nn.Conv1d(8, 8, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(nn.functional.pad(x, (4, 0)))))


@pytest.mark.parametrize("slower, rows", [(1.1, True), (1.5, False)])
def test_channels_last_forms_everywhere_when_they_cost_little_more(monkeypatch, slower, rows):
    """Measured alone, conv a is fastest as `fold` and b as `fold-mm`; when a's fold-mm costs
    little more (x1.1: the sum is within ROWS_SLACK), both step as fold-mm (no layout change
    between them); at x1.5 each keeps its fastest form. Exact either way."""
    from cocompile.passes import choose_forms as cf
    monkeypatch.delenv(FORCE_ENV, raising=False)
    times = {"a": {"window": 3.0, "fold": 1.0, "fold-mm": slower, "partial": 3.0, "partial-mm": 3.0},
             "b": {"window": 3.0, "fold": 1.2, "fold-mm": 1.0, "partial": 3.0, "partial-mm": 3.0}}
    seen = iter("ab")
    monkeypatch.setattr(cf, "_measure", lambda site, forms, consts: (dict(times[next(seen)]), "measured"))
    assert (slower + 1.0 <= cf.ROWS_SLACK * (1.0 + 1.0)) == rows     # rows' sum against the best's
    torch.manual_seed(0)
    model, clip = Dilated().eval(), torch.randn(1, 4, 16)
    co = cocompile.compile(model, clip, time_dim=2)
    names = [f.name for f in conv_forms_of(co).values()]
    assert names == (["fold-mm", "fold-mm"] if rows else ["fold", "fold-mm"])
    assert cocompile.verify(model, co, torch.randn(2, 4, 16)).passed


def test_forms_measured_at_a_batch_are_cached_apart_and_exact(monkeypatch, tmp_path):
    """COCOMPILE_FORM_BATCH=N measures each conv's forms on steps of N streams: entries of
    their own in the cache, and the model streams exactly whatever it chose."""
    from cocompile.passes.choose_forms import BATCH_ENV
    monkeypatch.delenv(FORCE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    torch.manual_seed(0)
    model, clip = Stack().eval(), torch.randn(2, 3, 8, 6, 6)
    cocompile.compile(model, clip[:1], time_dim=2, trace=False)
    one = set(os.listdir(cache_dir()))
    monkeypatch.setenv(BATCH_ENV, "3")
    co = cocompile.compile(model, clip[:1], time_dim=2, trace=False)
    assert len(set(os.listdir(cache_dir())) - one) == len(one) > 0
    assert all(f.how in ("measured", "only") for f in conv_forms_of(co).values())
    assert cocompile.verify(model, co, clip).passed
    monkeypatch.setenv(BATCH_ENV, "many")
    with pytest.raises(cocompile.CompileError, match=f"{BATCH_ENV}='many'"):
        cocompile.compile(model, clip[:1], time_dim=2, trace=False)


def test_a_form_that_does_not_exist_is_refused(monkeypatch):
    for value in ("fast", "fold-mm,fast"):
        monkeypatch.setenv(FORCE_ENV, value)
        with pytest.raises(cocompile.CompileError, match=f"{FORCE_ENV}.*'fast'"):
            cocompile.compile(nn.Conv1d(2, 2, 3), torch.randn(1, 2, 8), trace=False)


def test_a_list_of_forms_gives_each_conv_the_first_that_applies(monkeypatch):
    monkeypatch.setenv(FORCE_ENV, "partial-mm,mm")
    model = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.Conv1d(4, 4, 1), nn.Conv1d(4, 4, 2, stride=2))
    co = cocompile.compile(model.eval(), torch.randn(1, 2, 8), trace=False)
    assert [f.name for f in conv_forms_of(co).values()] == ["partial-mm", "mm", "window"]


def test_a_conv_whose_step_is_its_window(form):
    """Kernel = stride, no padding: a step reads exactly its new frames and keeps no state (the
    rows forms once asked for a state the conv does not have)."""
    torch.manual_seed(0)
    models = ((nn.Sequential(nn.Conv1d(2, 3, 2, stride=2), nn.ReLU(), nn.Conv1d(3, 2, 1)), torch.randn(2, 2, 8)),
              (nn.Conv2d(2, 3, (2, 1), stride=(2, 1)), torch.randn(2, 2, 8, 3)))
    for model, clip in models:
        co = cocompile.compile(model.eval(), clip[:1], time_dim=2)
        report = cocompile.verify(model, co, clip)
        assert report.passed, f"{form}\n{report}"
        assert len(co.specs) == 1                   # the frame counter alone


class RowsBlocks(nn.Module):
    """Two residual blocks of 1x1 convs and centred temporal convs (kernel 5, then 3 dilated 2),
    time on axis t: with -mm forms every conv is a channels-last product, and each residual is
    delayed (the temporal conv lags by its padding)."""

    def __init__(self, t: int):
        super().__init__()

        def temporal(k, dil):
            kernel, pad, d = [1, 1], [0, 0], [1, 1]
            kernel[t - 2], pad[t - 2], d[t - 2] = k, dil * (k - 1) // 2, dil
            return nn.Conv2d(4, 4, kernel, padding=pad, dilation=d)

        self.a, self.b = nn.Conv2d(3, 4, 1), temporal(5, 1)
        self.c, self.d = nn.Conv2d(4, 4, 1), temporal(3, 2)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        h = torch.relu(self.a(x))
        h = torch.relu(self.bn(self.b(h)) + h)
        return self.d(torch.relu(self.c(h))) + h


@pytest.mark.parametrize("forms", ["fold-mm,mm", "partial-mm,mm"])
@pytest.mark.parametrize("t", [2, 3])
def test_delays_of_a_channels_last_step_keep_rows(monkeypatch, tmp_path, forms, t):
    """A step of channels-last products keeps its delays' frames as rows (N, other, frames, C):
    E1/E2 against the model, E4 in onnxruntime, where the Transposes between products cancel
    (the input's and the output's are left)."""
    monkeypatch.setenv(FORCE_ENV, forms)
    torch.manual_seed(0)
    model = RowsBlocks(t)
    model.bn.running_mean.normal_()
    model.eval()
    shape = [2, 3, 5, 5]
    shape[t] = 12
    clip = torch.randn(shape)
    co = cocompile.compile(model, clip[:1], time_dim=t)
    report = cocompile.verify(model, co, clip)
    assert report.passed, str(report)
    delays = [s for s in co.specs if s.name.endswith(".delay")]
    assert [s.shape for s in delays] == [(5, 2, 4)] * 2
    path = str(co.export(tmp_path / "co.onnx"))
    assert e4(co, path) <= 1e-5
    assert [n.op_type for n in onnx.load(path).graph.node].count("Transpose") <= 2


# -- einsum with a fixed operand, as one matrix product --------------------------------------------
@pytest.mark.parametrize("lx,lw,lo,sx,sw", [
    ("nkctv", "kvw", "nctw", (2, 3, 8, 1, 25), (3, 25, 25)),     # ST-GCN's graph conv, one frame
    ("nkctv", "kvw", "nctw", (2, 3, 8, 4, 25), (3, 25, 25)),
    ("bij", "jk", "bik", (4, 5, 6), (6, 7)),
    ("abc", "cd", "dba", (2, 3, 4), (4, 5))])
def test_einsum_by_matmul_in_every_memory_order(lx, lw, lo, sx, sw):
    """The same values as einsum whatever the chunk's memory order (float64); for rows (channels
    last) the joints are mixed without a copy and the output stays channels-last."""
    torch.manual_seed(0)
    x, w = torch.randn(sx).double(), torch.randn(sw).double()
    ref = torch.einsum(f"{lx},{lw}->{lo}", x, w)
    for perm in itertools.permutations(range(len(sx))):
        xp = x.permute(perm).contiguous().permute([perm.index(i) for i in range(len(sx))])
        torch.testing.assert_close(einsum_by_matmul(lx, lw, lo, xp, w), ref, rtol=0, atol=1e-12)
    if lx == "nkctv":
        rows = x.permute(0, 3, 4, 1, 2).contiguous().permute(0, 3, 4, 1, 2)     # (n, t, v, k, c) in memory
        out = einsum_by_matmul(lx, lw, lo, rows, w)
        assert out.permute(0, 2, 3, 1).is_contiguous()                         # (n, t, w, c): rows again
    assert einsum_by_matmul("bij", "bjk", "bik", torch.randn(2, 3, 4), torch.randn(2, 4, 5)) is None
    assert einsum_by_matmul("ii", "ij", "j", torch.randn(3, 3), torch.randn(3, 4)) is None


def test_a_kernel_of_ones_channels_first_is_the_convolution():
    """The portable (ONNX) product of a kernel-1 conv: W @ x over the flattened positions."""
    torch.manual_seed(0)
    for shape in [(2, 5, 3), (2, 5, 1, 7), (1, 5, 2, 3, 4)]:
        x, w, b = torch.randn(shape).double(), torch.randn(6, 5).double(), torch.randn(6).double()
        nd = len(shape) - 2
        ref = aten.convolution(x, w.view(6, 5, *[1] * nd), b, [1] * nd, [0] * nd, [1] * nd, False, [0] * nd, 1)
        torch.testing.assert_close(channels_first_mm(x, w, b), ref, rtol=0, atol=1e-12)
        torch.testing.assert_close(channels_first_mm(x, w, None), ref - b.view(1, 6, *[1] * nd),
                                   rtol=0, atol=1e-12)


@pytest.mark.parametrize("lx,lw,lo,sx,sw", [
    ("nkctv", "kvw", "nctw", (2, 3, 8, 1, 25), (3, 25, 25)),     # ST-GCN's graph conv on NCHW
    ("nkctv", "kvw", "nwtc", (2, 3, 8, 4, 25), (3, 25, 25)),
    ("nctv", "vw", "nctw", (2, 8, 3, 25), (25, 25)),
    ("bij", "jk", "bik", (4, 5, 6), (6, 7)),
    ("aibj", "ijc", "acb", (2, 3, 4, 5), (3, 5, 6))])
def test_einsum_by_batched_matmul_keeps_x_in_place(lx, lw, lo, sx, sw):
    """The portable form of the same einsum: equal values (float64); x is only viewed, so where
    the output order is x's own the result needs no copy either."""
    torch.manual_seed(0)
    x, w = torch.randn(sx).double(), torch.randn(sw).double()
    out = einsum_by_batched_matmul(lx, lw, lo, x, w)
    torch.testing.assert_close(out, torch.einsum(f"{lx},{lw}->{lo}", x, w), rtol=0, atol=1e-12)
    if lo == "nctw":
        assert out.is_contiguous()
    # x's last letter must be summed with w; batch letters are for einsum itself
    assert einsum_by_batched_matmul("abc", "bd", "acd", torch.randn(2, 3, 4), torch.randn(3, 5)) is None
    assert einsum_by_batched_matmul("bij", "bjk", "bik", torch.randn(2, 3, 4), torch.randn(2, 4, 5)) is None
