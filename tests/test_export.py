"""Artifacts (docs/design.md, "Artifacts"): E4 for .onnx, .pt and .pt2, names, dynamic batch, metadata.

The oracle is the eager continual model (`co.step`); each artifact is loaded with its own
runtime (onnxruntime, torch.jit.load, torch.export.load), not through cocompile's helpers.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from torch.utils import _pytree as pytree

import cocompile
from cocompile import metadata as md
from cocompile.export import check_artifact

FORMATS = (".onnx", ".pt", ".pt2")
E4_RTOL = 1e-5


# -- tiny models ---------------------------------------------------------------------------------
class Block3d(nn.Module):
    """Padded 3x3x3 conv, temporal-only conv, residual join (needs a delay)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv_a = nn.Conv3d(c, c, 3, padding=1)
        self.conv_b = nn.Conv3d(c, c, (3, 1, 1), padding=(1, 0, 0))

    def forward(self, x):
        return x + self.conv_b(torch.relu(self.conv_a(x)))


class Conv3dNet(nn.Module):
    """(N, 2, T, H, W) -> (N, 3): padded Conv3d stack with a spatial max pool, residuals and a
    mean head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv3d(2, 4, 3, padding=1)
        self.pool = nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
        self.blocks = nn.Sequential(Block3d(4), Block3d(4))
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.blocks(self.pool(self.stem(x))).mean((2, 3, 4)))


class StridedTCN(nn.Module):
    """(N, 3, T) -> per-frame (N, 4, T') at half rate, and a clip-level mean (N, 8)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(3, 8, 3, stride=2)
        self.c2 = nn.Conv1d(8, 8, 3, dilation=2, padding=2)
        self.out = nn.Conv1d(8, 4, 1)

    def forward(self, x):
        h = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.out(h), h.mean(2)


MODELS = {"conv3d": (Conv3dNet, (1, 2, 8, 6, 6)), "tcn": (StridedTCN, (1, 3, 16))}


def build(name: str, seed: int = 0):
    """(model, example clip, continual model) for one of MODELS."""
    torch.manual_seed(seed)
    cls, shape = MODELS[name]
    model = cls().eval()
    clip = torch.randn(shape)
    return model, clip, cocompile.compile(model, clip, time_dim=2)


@pytest.fixture(scope="module", params=sorted(MODELS))
def compiled(request):
    return (request.param, *build(request.param))


@pytest.fixture(scope="module")
def artifacts(compiled, tmp_path_factory):
    name, _, _, co = compiled
    folder = tmp_path_factory.mktemp(name)
    return {fmt: co.export(folder / f"co_model{fmt}") for fmt in FORMATS}


# -- independent runners -------------------------------------------------------------------------
def runner(path: str):
    """`run(x, *state) -> list of tensors` through the artifact's own runtime."""
    if path.endswith(".onnx"):
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]
        return lambda *a: [torch.from_numpy(o) for o in sess.run(None, {n: t.numpy() for n, t in zip(names, a)})]
    if path.endswith(".pt"):
        module = torch.jit.load(path)
        return lambda *a: list(module(*a))
    module = torch.export.load(path).module()
    return lambda *a: list(module(*a))


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    assert tuple(got.shape) == tuple(ref.shape), (got.shape, ref.shape)
    assert got.dtype == ref.dtype, (got.dtype, ref.dtype)
    if not ref.numel():
        return 0.0
    return float((got.double() - ref.double()).abs().max()) / max(1.0, float(ref.double().abs().max()))


def e4(co, path: str, batch: int = 2, seed: int = 1) -> float:
    """Largest relative error of the artifact, stepping its own state, against co.step on `batch`
    streams of different random frames for 3·T steps from the zero state."""
    run, g = runner(path), torch.Generator().manual_seed(seed)
    ref_state = art_state = co.initial_state(batch)
    worst, n = 0.0, len(co.out_infos)
    for _ in range(3 * co.clip_length):
        x = torch.randn(co._chunk_shape(batch, co.step_frames), generator=g)
        outs, ref_state = co.step(x, ref_state)
        ref = [*pytree.tree_leaves(outs), *ref_state]
        got = run(x, *art_state)
        art_state = tuple(got[n:])
        worst = max([worst] + [rel_err(a, b) for a, b in zip(got, ref)])
        assert len(got) == len(ref)
    return worst


# -- E4 ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_e4_two_streams(compiled, artifacts, fmt):
    name, _, _, co = compiled
    err = e4(co, str(artifacts[fmt]))
    print(f"E4 {name}{fmt}: max rel err {err:.3g}")
    assert err <= E4_RTOL


def test_streams_of_a_batch_differ(compiled):
    """The E4 batch really holds two different streams (else batch mixing would go unnoticed)."""
    _, _, _, co = compiled
    state = co.initial_state(2)
    for _ in range(2 * co.clip_length // co.step_frames):
        outs, state = co.step(torch.randn(co._chunk_shape(2, co.step_frames)), state)
    for leaf in pytree.tree_leaves(outs):
        assert not torch.equal(leaf[0], leaf[1])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("batch", [1, 3])
def test_any_batch_size(compiled, artifacts, fmt, batch):
    name, _, _, co = compiled
    args = [torch.randn(co._chunk_shape(batch, co.step_frames))]
    args += [s.normal_() if s.is_floating_point() else s + 4 for s in co.initial_state(batch)]
    outs, nxt = co.step(args[0], tuple(args[1:]))
    got = runner(str(artifacts[fmt]))(*args)
    for a, b in zip(got, [*pytree.tree_leaves(outs), *nxt]):
        assert rel_err(a, b) <= E4_RTOL


def test_check_artifact_passes_and_catches_a_wrong_artifact(artifacts, tmp_path):
    _, _, co = build("tcn")
    good = co.export(tmp_path / "good.onnx")
    report = check_artifact(co, good)
    assert report.passed and report.steps == 3 * co.clip_length, report
    _, _, other = build("tcn", seed=1)          # same architecture, other weights
    bad = other.export(tmp_path / "bad.onnx")
    assert not check_artifact(co, bad).passed


# -- ONNX structure ------------------------------------------------------------------------------
def test_onnx_names_batch_axis_and_checker(compiled, artifacts):
    _, _, _, co = compiled
    model = onnx.load(str(artifacts[".onnx"]))
    onnx.checker.check_model(model, full_check=True)
    states = [s.name for s in co.specs]
    assert [i.name for i in model.graph.input] == ["x", *states]
    outs = ["y"] if len(co.out_infos) == 1 else [f"y.{i}" for i in range(len(co.out_infos))]
    assert [o.name for o in model.graph.output] == outs + ["next_state." + s[len("state."):] for s in states]
    for value in [*model.graph.input, *model.graph.output]:
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch", value.name
    assert states[0] == "state.frames"
    assert all(s.startswith("state.") for s in states)


def test_onnx_metadata(compiled, artifacts):
    _, _, clip, co = compiled
    props = {p.key: p.value for p in onnx.load(str(artifacts[".onnx"])).metadata_props}
    meta = json.loads(props["cocompile"])
    assert meta["format_version"] == md.FORMAT_VERSION
    assert meta["versions"] == {"cocompile": cocompile.__version__, "torch": torch.__version__}
    assert (meta["step_frames"], meta["clip_length"]) == (co.step_frames, co.clip_length)
    assert (meta["delay"], meta["receptive_field"]) == (co.delay, co.receptive_field)
    assert meta["inputs"][0]["time_axis"] == 2 and meta["inputs"][0]["dtype"] == "float32"
    assert meta["inputs"][0]["shape"] == [None, *clip.shape[1:2], co.step_frames, *clip.shape[3:]]
    for entry, spec in zip(meta["states"], co.specs, strict=True):
        assert entry["name"] == spec.name and entry["init"] == "zeros" and entry["doc"]
        assert entry["shape"] == [None, *spec.shape] and entry["dtype"] == str(spec.dtype)[6:]
    for entry, info in zip(meta["outputs"], co.out_infos, strict=True):
        assert entry["kind"] == info.kind and entry["exactness"] in md.EXACTNESS


def test_validity_from_metadata_alone(compiled, artifacts):
    """A consumer that reads only the metadata knows, step by step, which output frames are valid:
    the same as the stateful ContinualModel, which returns exactly its valid frames."""
    _, _, _, co = compiled
    props = {p.key: p.value for p in onnx.load(str(artifacts[".onnx"])).metadata_props}
    meta = json.loads(props["cocompile"])
    c = meta["step_frames"]
    co.reset()
    for k in range(3 * co.clip_length // c):
        got = pytree.tree_leaves(co(torch.randn(co._chunk_shape(1, c))), is_leaf=lambda v: v is None)
        for out, value in zip(meta["outputs"], got):
            if out["kind"] == "time":
                fps = out["frames_per_step"]
                valid = fps - max(out["warmup"] - k * fps, 0)
                n = 0 if value is None else value.shape[out["time_axis"]]
                assert n == max(valid, 0), (out["name"], k)
                assert (k >= out["valid_from_step"]) == (n > 0)
            elif out["kind"] == "clip":
                assert (value is not None) == ((k + 1) * c >= out["ready"]), (out["name"], k)
                assert (value is not None) == (k >= out["valid_from_step"])
    co.reset()


@pytest.mark.parametrize("fmt", [".pt", ".pt2"])
def test_torch_artifacts_carry_metadata(compiled, artifacts, fmt):
    _, _, _, co = compiled
    extra = {md.EXTRA_FILE: ""}
    if fmt == ".pt":
        torch.jit.load(str(artifacts[fmt]), _extra_files=extra)
    else:
        torch.export.load(str(artifacts[fmt]), extra_files=extra)
    meta = json.loads(extra[md.EXTRA_FILE])
    assert [s["name"] for s in meta["states"]] == [s.name for s in co.specs]


def test_unknown_suffix_names_the_supported_ones(compiled, tmp_path):
    _, _, _, co = compiled
    with pytest.raises(cocompile.CompileError, match=r"\.onnx, \.pt, \.pt2"):
        co.export(tmp_path / "co_model.tflite")


def test_zero_initial_state_is_documented(compiled, artifacts):
    """The ONNX inputs carry each state's doc string; the initial state is all zeros."""
    _, _, _, co = compiled
    model = onnx.load(str(artifacts[".onnx"]))
    docs = {i.name: i.doc_string for i in model.graph.input}
    assert all(docs[s.name] == s.doc for s in co.specs)
    assert all(not s.any() for s in co.initial_state(2))
    np.testing.assert_array_equal(co.initial_state(1)[0].numpy(), np.zeros(1, dtype=np.int64))


# -- examples/torchscript_runner.py (documented example, run as documented) ------------------------
EXAMPLE = __import__("pathlib").Path(__file__).resolve().parents[1] / "examples" / "torchscript_runner.py"


def test_torchscript_runner_example(compiled, artifacts):
    """The example's loop (metadata only, no cocompile) gives the stateful model's valid outputs."""
    import importlib.util
    import subprocess
    import sys

    _, _, _, co = compiled
    path = str(artifacts[".pt"])
    proc = subprocess.run([sys.executable, str(EXAMPLE), path], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "first valid at step" in proc.stdout, proc.stderr
    spec = importlib.util.spec_from_file_location("torchscript_runner", EXAMPLE)
    runner_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner_mod)
    frames = torch.randn(2, 2 * co.clip_length, *co.frame_shape)
    got = runner_mod.run(path, frames)
    co.reset()
    clip = frames.movedim(1, co.time_dim)
    for k, step in enumerate(got):
        want = co(clip.narrow(co.time_dim, k * co.step_frames, co.step_frames))
        for g, w in zip(step, pytree.tree_leaves(want, is_leaf=lambda v: v is None)):
            assert (g is None) == (w is None), k
            if w is not None:
                assert rel_err(g, w) <= E4_RTOL
    co.reset()


# -- every example model, every format -------------------------------------------------------------
EXAMPLE_VARIANTS = [("tcn", {}, False), ("slow_resnet", {}, False), ("r2plus1d", {}, False),
                    ("x3d", {"se": False}, False), ("x3d", {"se": True}, True),
                    ("stgcn", {"variant": "strided"}, False)]


@pytest.mark.parametrize("name, kwargs, approximate", EXAMPLE_VARIANTS,
                         ids=["tcn", "slow_resnet", "r2plus1d", "x3d", "x3d-se", "stgcn"])
def test_examples_e4_every_format(name, kwargs, approximate, tmp_path):
    """E4 on the examples (small size): every format, 3·T steps, two streams."""
    import importlib
    import sys

    examples = str(EXAMPLE.parent)
    if examples not in sys.path:
        sys.path.insert(0, examples)
    mod = importlib.import_module(name)
    model, clip = mod.build("small", **kwargs), mod.example_input("small")
    co = cocompile.compile(model, clip, time_dim=mod.TIME_DIM, approximate=approximate)
    for fmt in FORMATS:
        err = e4(co, str(co.export(tmp_path / f"co_model{fmt}")))
        print(f"E4 {name}{'-se' if kwargs.get('se') else ''}{fmt}: max rel err {err:.3g}")
        assert err <= E4_RTOL, fmt
