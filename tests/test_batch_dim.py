"""Inputs whose batch is not axis 0 (`batch_dim`): time-major (T, N, F) frames for nn.LSTM and
nn.TransformerEncoder as torch defines them (batch_first=False).

Oracle: the untouched offline model (E1 on a batch of two different streams, and each stream
alone); `co.step` for every artifact (E4) and for the numpy runtime. Chunks and outputs keep the
user's layout; the metadata and the ONNX graph name every input's and output's batch axis.
"""
from __future__ import annotations

import json
import os
import textwrap

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

import cocompile
from cocompile.cli import main
from cocompile.aoti import spec_lines
from cocompile.export import check_artifact
from cocompile.loading import load_model
from cocompile.runtime import Session
from cocompile.triton import write_repository

T, N, F = 6, 2, 3


class Tagger(nn.Module):
    """Time-major LSTM: (T, N, F) frames -> per-frame y (T, N, H), the newest frame y[-1] (N, H)
    and h_n (layers, N, H)."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(F, 5, num_layers=2)

    def forward(self, x):
        y, (h, _) = self.rnn(x)
        return y, y[-1], h


class Encoder(nn.Module):
    """Time-major causal Transformer encoder: (T, N, d) tokens -> per-token scores (T, N, 3)."""

    def __init__(self, d=8):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d, 2, 2 * d, dropout=0.0)       # batch_first=False
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.out = nn.Linear(d, 3)

    def forward(self, x):
        mask = nn.Transformer.generate_square_subsequent_mask(x.size(0))
        return self.out(self.enc(x, mask=mask, is_causal=True))


def assert_exact(got, ref):
    """E1's bound: max|Δ| <= 1e-4 * max(1, max|ref|), shapes equal."""
    for g, r in zip(pytree.tree_leaves(got), pytree.tree_leaves(ref), strict=True):
        assert g.shape == r.shape
        assert (g - r).abs().max() <= 1e-4 * max(1.0, r.abs().max().item())


@pytest.fixture(scope="module")
def lstm():
    torch.manual_seed(0)
    model, clip = Tagger().eval(), torch.randn(T, N, F)
    # the tests check E1 themselves (two streams, and each alone), so compile skips its own check
    return model, clip, cocompile.compile(model, clip, time_dim=0, batch_dim=1, verify=False)


@pytest.fixture(scope="module")
def artifacts(lstm, tmp_path_factory):
    d = tmp_path_factory.mktemp("batch_dim")
    return {suffix: lstm[2].export(str(d / f"tagger{suffix}")) for suffix in (".onnx", ".pt", ".pt2")}


# -- E1, the user's layout ------------------------------------------------------------------------------
def test_time_major_lstm_is_exact_on_two_streams_and_each_alone(lstm):
    model, clip, co = lstm
    assert (co.time_dim, co.batch_dim, co.out_batch_dims) == (0, 1, [1, 0, 1])
    with torch.no_grad():
        ref = model(clip)
        assert_exact(co.forward_steps(clip), ref)
        for s in range(N):
            alone = clip[:, s:s + 1]
            assert_exact(co.forward_steps(alone), model(alone))


def test_step_stateful_forward_and_flush_keep_the_users_layout(lstm):
    model, clip, co = lstm
    c = co.step_frames
    with torch.no_grad():
        ref = model(clip)
        state = co.initial_state(N)
        assert all(s.shape[0] == N for s in state)                  # states are batch-first
        ys = []
        for k in range(0, T, c):
            (y, last, h), state = co.step(clip[k:k + c], state)   # a (c, N, F) chunk
            assert y.shape == (c, N, 5) and last.shape == (N, 5) and h.shape == (2, N, 5)
            ys.append(y)
        assert_exact(torch.cat(ys), ref[0])
        assert_exact(co.flush(state)[1:], ref[1:])
        co.reset()
        assert_exact(co(clip), ref)                               # stateful, whole clip at once


def test_metadata_and_onnx_graph_name_every_batch_axis(lstm, artifacts):
    _, _, co = lstm
    meta = co.metadata()
    (x,) = meta["inputs"]
    assert (x["batch_axis"], x["time_axis"], x["shape"]) == (1, 0, [co.step_frames, None, F])
    assert [o["batch_axis"] for o in meta["outputs"]] == [1, 0, 1]
    assert [o["shape"] for o in meta["outputs"]] == [[co.step_frames, None, 5], [None, 5], [2, None, 5]]
    graph = onnx.load(artifacts[".onnx"]).graph
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*graph.input, *graph.output]}
    assert dims["x"] == [co.step_frames, "batch", F]
    assert (dims["y.0"], dims["y.1"], dims["y.2"]) == ([co.step_frames, "batch", 5], ["batch", 5], [2, "batch", 5])
    assert all(dims[s.name][0] == "batch" for s in co.specs)
    # the AOTInductor package's lines for C++ mark the batch axis wherever it is
    lines = spec_lines(meta["inputs"]).split()
    assert lines == ["x", "float32", str(co.step_frames), "-1", str(F)]


# -- artifacts ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".onnx", ".pt", ".pt2"])
def test_every_artifact_steps_time_major_chunks_like_the_model(lstm, artifacts, suffix):
    report = check_artifact(lstm[2], artifacts[suffix], steps=2 * T, batch=2)
    assert report.passed and report.batch == 2, str(report)


def test_runtime_stacks_pushed_frames_along_the_artifacts_axes(lstm, artifacts):
    model, clip, co = lstm
    sess = Session(artifacts[".onnx"])
    assert (sess.batch_axis, sess.time_axis, sess.batched_shape(N)) == (1, 0, (co.step_frames, N, F))
    chunk = clip[:co.step_frames].numpy()
    outs, _ = sess.step(chunk, sess.initial_state(N))
    with torch.no_grad():
        ref, _ = co.step(clip[:co.step_frames], co.initial_state(N))
        y, last, h = model(clip)
    for got, want in zip(outs, ref):
        np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-5)
    streams = sess.streams(N)
    pushed = [streams.push(frame) for frame in clip.numpy()]      # each (N, F): one frame per stream
    for s in range(N):
        frames = np.concatenate([p[s][0] for p in pushed])          # stream s: (T, H), no batch axis
        np.testing.assert_allclose(frames, y[:, s].numpy(), rtol=0, atol=1e-5)
        np.testing.assert_allclose(pushed[-1][s][1], last[s].numpy(), rtol=0, atol=1e-5)
        np.testing.assert_allclose(pushed[-1][s][2], h[:, s].numpy(), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"expected \(1, batch, 3\)"):      # a batch-first chunk
        sess.step(np.zeros((N, 1, F), np.float32), sess.initial_state(N))


def test_triton_model_takes_and_returns_batch_first_tensors(lstm, artifacts, tmp_path):
    _, clip, co = lstm
    folder = write_repository(artifacts[".onnx"], str(tmp_path / "repo"))
    config = open(os.path.join(folder, "config.pbtxt")).read()
    assert "max_batch_size: 64" in config and f'name: "x" data_type: TYPE_FP32 dims: [{co.step_frames}, {F}]' in config
    triton = ort.InferenceSession(os.path.join(folder, "1", "model.onnx"))
    meta = json.loads(triton.get_modelmeta().custom_metadata_map["cocompile"])
    assert [(i["batch_axis"], i["time_axis"]) for i in meta["inputs"]] == [(0, 1)]
    state = [s.numpy() for s in co.initial_state(N)]
    feeds = {"x": clip[:co.step_frames].movedim(1, 0).numpy(), "START": np.zeros((N, 1), np.float32),
             **{s.name: v for s, v in zip(co.specs, state)}}
    feeds["state.frames"] = state[0][:, None]
    got = triton.run(None, feeds)
    with torch.no_grad():
        ref, _ = co.step(clip[:co.step_frames], co.initial_state(N))
    for g, r, b in zip(got, ref, co.out_batch_dims):
        np.testing.assert_allclose(g, r.movedim(b, 0).numpy(), rtol=0, atol=1e-5)


# -- a time-major Transformer encoder -------------------------------------------------------------------
def test_time_major_causal_transformer_encoder_is_exact():
    torch.manual_seed(0)
    model, clip = Encoder().eval(), torch.randn(T, N, 8)
    co = cocompile.compile(model, clip, time_dim=0, batch_dim=1, verify=False)     # E1 checked here
    with torch.no_grad():
        ref = model(clip)
        assert_exact(co.forward_steps(clip), ref)
        assert_exact(co.forward_steps(clip[:, 1:]), model(clip[:, 1:]))
        co.reset()
        tokens = [co(clip[t:t + 1]) for t in range(T)]                # one (1, N, 8) token per call
    assert co.out_batch_dims == [1]
    assert_exact(torch.cat(tokens), ref)                                # causal: each token at once


# -- CLI ------------------------------------------------------------------------------------------------
def test_cli_compiles_a_time_major_factory_with_batch_dim(tmp_path, capsys, monkeypatch):
    (tmp_path / "time_major.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        TIME_DIM = 0

        class Tagger(nn.Module):
            def __init__(self):
                super().__init__()
                self.rnn = nn.LSTM(3, 4)

            def forward(self, x):
                return self.rnn(x)[0]

        def build():
            torch.manual_seed(0)
            return Tagger()
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "tagger.pt2"
    code = main(["time_major:build", "--input-shape", "6,2,3", "--batch-dim", "1", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "batch axis 1" in printed and "E1" in printed and "E4" in printed
    # verify compiles the model as the artifact was: its batch and time axes from the metadata
    code = main(["verify", "time_major:build", str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and "PASSED" in printed and " ok" in printed.splitlines()[-1], printed
    code = main(["time_major:build", "--input-shape", "6,2,3", "--out", str(out)])
    assert code == 2 and "--batch-dim" in capsys.readouterr().err      # time axis 0 is the batch


def test_a_factory_module_may_name_its_batch_axis(tmp_path, monkeypatch):
    (tmp_path / "with_axes.py").write_text("from torch import nn\nTIME_DIM, BATCH_DIM = 0, 1\n"
                                           "def build():\n    return nn.Identity()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    loaded = load_model("with_axes:build")
    assert (loaded.time_dim, loaded.batch_dim) == (0, 1)


# -- refusals -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("time_dim, batch_dim, message", [
    (0, 3, r"batch_dim=3 is not an axis of input x"),
    (1, 1, r"time_dim=1 is not an axis of input x .* it is the batch axis \(batch_dim=1\)"),
    (0, 0, r"it is the batch axis \(batch_dim=0\)"),
    (0, [1, 0], r"batch_dim=\[1, 0\] does not match the structure"),
    (0, "1", r"batch_dim for input x is '1', not an axis"),
])
def test_bad_batch_axes_are_refused_with_the_fix(time_dim, batch_dim, message):
    with pytest.raises(cocompile.CompileError, match=message) as err:
        cocompile.compile(Tagger().eval(), torch.randn(T, N, F), time_dim=time_dim, batch_dim=batch_dim)
    assert "fix:" in str(err.value)


class Pooled(nn.Module):
    """Per-frame features summed over the streams: an output without a batch axis."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(F, 4, 3, padding=1)

    def forward(self, x):                                   # (T, N, F)
        y = self.conv(x.permute(1, 2, 0))                   # (N, 4, T)
        return y.sum(0), y


def test_an_output_without_a_batch_axis_is_exact_and_refused_where_streams_are_split(lstm, artifacts,
                                                                                     tmp_path):
    torch.manual_seed(0)
    model, clip = Pooled().eval(), torch.randn(T, N, F)
    co = cocompile.compile(model, clip, time_dim=0, batch_dim=1)
    assert co.out_batch_dims == [None, 0]
    assert co.metadata()["outputs"][0]["batch_axis"] is None
    with torch.no_grad():
        assert_exact(co.forward_steps(clip), model(clip))
    # the runtime and Triton read the batch axes from the metadata: an artifact with such an
    # output (the LSTM's, its y.1 marked so) is refused where streams would be split
    proto = onnx.load(artifacts[".onnx"])
    meta = json.loads(proto.metadata_props[0].value)
    meta["outputs"][1]["batch_axis"] = None
    onnx.helper.set_model_props(proto, {"cocompile": json.dumps(meta)})
    path = str(tmp_path / "mixed.onnx")
    onnx.save(proto, path)
    with pytest.raises(ValueError, match=r"y.1 have no batch axis"):
        Session(path).streams(2)
    with pytest.raises(cocompile.CompileError, match=r"output y.1 has no batch axis"):
        write_repository(path, str(tmp_path / "repo"))
