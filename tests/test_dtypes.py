"""Every precision (docs/precision.md): models in float64, float16 and bfloat16 compile, step in
their own dtype, and are judged against float64 ground truth; artifacts in each dtype, or a clear
refusal where onnxruntime or ONNX has no kernel for it.

The oracle is the untouched offline model: in the dtype under test (its own rounding error) and
in float64 (the truth). The full sweep over every example is examples/precision.py.
"""
from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn as nn
from onnx import TensorProto, helper
from torch.utils import _pytree as pytree

import cocompile
from cocompile.export import _check_loads, check_artifact, e4_rtol
from cocompile.verify import HALF_FACTOR, HALF_ULPS, rtol

HALF = (torch.float16, torch.bfloat16)


class Block(nn.Module):
    """Padded conv, causal dilated conv, BatchNorm, residual join (a delay)."""

    def __init__(self, c: int, dilation: int):
        super().__init__()
        self.conv = nn.Conv1d(c, c, 3, padding=1)
        self.causal = nn.Conv1d(c, c, 3, dilation=dilation)
        self.bn = nn.BatchNorm1d(c)
        self.pad = 2 * dilation

    def forward(self, x):
        y = torch.relu(self.conv(x))
        return x + self.bn(self.causal(nn.functional.pad(y, (self.pad, 0))))


class Net(nn.Module):
    """(N, 4, T) -> per-frame (N, 3, T) and clip-level (N, 5) from the mean over time."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv1d(4, 16, 1)
        self.blocks = nn.Sequential(Block(16, 1), Block(16, 2))
        self.frame_head, self.clip_head = nn.Conv1d(16, 3, 1), nn.Linear(16, 5)

    def forward(self, x):
        h = self.blocks(torch.relu(self.stem(x)))
        return self.frame_head(h), self.clip_head(h.mean(2))


def net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    model = Net().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


def clip(seed: int, dtype=torch.float32, frames: int = 16) -> torch.Tensor:
    return torch.randn(1, 4, frames, generator=torch.Generator().manual_seed(seed)).to(dtype)


def rel(got: torch.Tensor, truth: torch.Tensor) -> float:
    return float((got.double() - truth).abs().max()) / max(1.0, float(truth.abs().max()))


@functools.cache
def compile_in(dtype: torch.dtype):
    """(float64 model, model in `dtype`, its continual model), compiled once per module."""
    base = net()
    model = copy.deepcopy(base).to(dtype)
    return base.double(), model, cocompile.compile(model, clip(0, dtype))


@pytest.fixture(params=HALF + (torch.float64,), ids=str)
def compiled(request):
    return compile_in(request.param)


def test_states_constants_and_outputs_are_in_the_model_dtype(compiled):
    _, model, co = compiled
    dtype = next(model.parameters()).dtype
    state = co.initial_state(2)
    assert state[0].dtype == torch.int64                       # the frame counter
    assert {s.dtype for s in state[1:]} == {dtype}
    assert {b.dtype for b in co.program.buffers() if b.is_floating_point()} == {dtype}
    outs, state = co.step(clip(1, dtype)[:, :, :co.step_frames].expand(2, -1, -1), state)
    assert {t.dtype for t in pytree.tree_leaves(outs)} == {dtype}
    assert state[0].dtype == torch.int64 and {s.dtype for s in state[1:]} == {dtype}


def test_no_worse_than_the_offline_model_on_three_clips(compiled):
    """max|co - truth| <= HALF_FACTOR * max|model - truth| + HALF_ULPS ulps (float16/bfloat16),
    <= rtol(float64) (float64, where the model itself is the truth)."""
    wide, model, co = compiled
    dtype = next(model.parameters()).dtype
    eps = torch.finfo(dtype).eps
    for seed in (1, 2, 3):
        x = clip(seed)
        with torch.no_grad():
            truth = pytree.tree_leaves(wide(x.double()))
            off = pytree.tree_leaves(model(x.to(dtype)))
            got = pytree.tree_leaves(co.forward_steps(x.to(dtype)))
        for t, o, g in zip(truth, off, got):
            assert g.dtype == dtype
            allowed = HALF_FACTOR * rel(o, t) + HALF_ULPS * eps if dtype in HALF else rtol(dtype)
            assert rel(g, t) <= allowed, (dtype, seed, rel(g, t), rel(o, t))
            if dtype in HALF:
                assert rel(o, t) > eps / 8          # the dtype's rounding shows: the check has teeth
            # a wrong stream (frames one step late) is far outside the bound
            assert rel(g.roll(1, -1), t) > 10 * allowed or g.dim() < 3


def test_verify_judges_half_models_against_float64(compiled):
    _, model, co = compiled
    dtype = next(model.parameters()).dtype
    report = cocompile.verify(model, co, clip(4, dtype))
    assert report.passed, str(report)
    e1 = [c for c in report.checks if c.name == "E1"]
    if dtype in HALF:         # bound: twice the model's own error against float64, plus 4 ulps
        wide = copy.deepcopy(model).double()   # verify's truth: these weights and this clip in float64
        with torch.no_grad():
            truth = pytree.tree_leaves(wide(clip(4, dtype).double()))
            off = pytree.tree_leaves(model(clip(4, dtype)))
        for c, t, o in zip(e1, truth, off):
            scale = max(1.0, float(t.abs().max()))
            assert c.bound == pytest.approx(HALF_FACTOR * float((o.double() - t).abs().max())
                                            + HALF_ULPS * torch.finfo(dtype).eps * scale)
    else:
        assert all(c.bound <= 2e-13 * c.scale for c in e1)
    # the same check fails the continual model against a model of other weights
    other = net(seed=1).to(dtype)
    assert not cocompile.verify(other, co, clip(4, dtype), sliding_steps=0).passed


def test_rtol_scales_float32s_bound_by_the_dtype_eps():
    assert rtol(torch.float32) == 1e-4
    assert rtol(torch.float64) == pytest.approx(1e-4 * 2.0 ** -52 / 2.0 ** -23)
    assert rtol(torch.bfloat16) > rtol(torch.float16) > rtol(torch.float32)


def test_a_model_without_kernels_in_the_dtype_is_refused_clearly():
    """torch has no float16 avg_pool3d on the CPU: the model cannot run, so compile says so."""
    model = nn.Sequential(nn.Conv3d(2, 2, 1), nn.AvgPool3d((2, 2, 2))).half().eval()
    with pytest.raises(cocompile.CompileError, match="does not run in torch.float16 on cpu"):
        cocompile.compile(model, torch.randn(1, 2, 4, 4, 4).half())


# -- artifacts --------------------------------------------------------------------------------------
def test_float16_onnx_reproduces_the_float16_step(tmp_path):
    co = compile_in(torch.float16)[2]
    e4 = check_artifact(co, co.export(tmp_path / "co16.onnx"))
    assert e4.bound == e4_rtol(torch.float16) and e4.passed, str(e4)


@pytest.mark.parametrize("dtype,suffix", [(torch.float64, ".pt2"), (torch.bfloat16, ".pt")], ids=str)
def test_torch_artifacts_in_every_dtype(tmp_path, dtype, suffix):
    co = compile_in(dtype)[2]
    e4 = check_artifact(co, co.export(tmp_path / f"co{suffix}"))
    assert e4.passed and e4.bound == e4_rtol(dtype), str(e4)


def test_bfloat16_onnx_is_refused_at_export(tmp_path, monkeypatch):
    """ONNX defines no bfloat16 Conv: refused when written, naming the op and the fix, and
    nothing is written. (Every conv steps in its window form here, a Conv; the measured forms
    may be matrix products, which onnxruntime refuses in bfloat16 too: see the next test.)"""
    from cocompile.ops.conv_forms import FORCE_ENV
    monkeypatch.setenv(FORCE_ENV, "window")
    co = cocompile.compile(net().to(torch.bfloat16), clip(0, torch.bfloat16))
    path = tmp_path / "co.onnx"
    with pytest.raises(cocompile.CompileError, match="no bfloat16 Conv") as err:
        co.export(path)
    assert "float16" in err.value.hint and ".pt2" in err.value.hint
    assert not path.exists()


@pytest.mark.parametrize("dtype,op", [(TensorProto.DOUBLE, "Conv"), (TensorProto.BFLOAT16, "Gemm")])
def test_onnx_that_onnxruntime_cannot_load_is_refused(dtype, op):
    """onnxruntime has no float64 Conv and no bfloat16 Gemm (models ONNX allows): the check that
    export runs on a non-float32 step names the op."""
    shape = [1, 2, 3] if op == "Conv" else [2, 2]
    inputs = [helper.make_tensor_value_info(n, dtype, shape) for n in ("x", "w")]
    y = helper.make_tensor_value_info("y", dtype, None)
    graph = helper.make_graph([helper.make_node(op, ["x", "w"], ["y"])], "g", inputs, [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    torch_dtype = torch.float64 if dtype == TensorProto.DOUBLE else torch.bfloat16
    with pytest.raises(cocompile.CompileError, match=f"no {str(torch_dtype)[6:]} kernel for {op}"):
        _check_loads(model, torch_dtype)


def test_onnxruntime_crashing_on_the_artifact_is_refused_not_fatal(monkeypatch):
    """onnxruntime 1.32's full graph optimisations crash (SIGSEGV) on some float16 steps (OadTR):
    the load check runs in a child, so the crash is a CompileError here, not a dead process."""
    import cocompile.export as export

    monkeypatch.setattr(export, "_LOAD_CHILD", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2])]
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    with pytest.raises(cocompile.CompileError, match=r"onnxruntime crashed \(signal 11\)"):
        _check_loads(model, torch.float16)


def test_to_converts_a_compiled_model_and_its_states():
    """co.half() converts the program's constants (folded in float32, then rounded once); states,
    inputs and the traced step follow, and the criterion holds as for a model compiled in float16."""
    model = net()
    co = cocompile.compile(model, clip(0))
    co.forward_steps(clip(1))                        # a step graph traced in float32
    co.half()
    assert co.dtype == torch.float16 and co.initial_state(1)[1].dtype == torch.float16
    assert co.initial_state(1)[0].dtype == torch.int64
    with torch.no_grad():
        truth = pytree.tree_leaves(copy.deepcopy(model).double()(clip(1).double()))
        off = pytree.tree_leaves(model.half()(clip(1).half()))
        got = pytree.tree_leaves(co.forward_steps(clip(1).half()))
    eps = torch.finfo(torch.float16).eps
    for g, o, t in zip(got, off, truth):
        assert g.dtype == torch.float16
        assert rel(g, t) <= HALF_FACTOR * rel(o, t) + HALF_ULPS * eps
