"""The Triton repository: config.pbtxt parses with Triton's own model-config protobuf and matches
the model; START zeroes every state; otherwise the model steps exactly like the artifact."""
import importlib.util
import os

import numpy as np
import onnxruntime as ort
import pytest
import torch
from google.protobuf import text_format
from torch import nn

import cocompile
from cocompile.triton import write_repository


def model_config_pb2():
    """tritonclient's generated model_config_pb2, loaded without its gRPC client package."""
    spec = importlib.util.find_spec("tritonclient")
    path = os.path.join(os.path.dirname(spec.origin), "grpc", "model_config_pb2.py")
    mod_spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(4, 6, 3, padding=1), nn.ReLU(), nn.Conv1d(6, 6, 3, stride=2),
                          nn.AdaptiveMaxPool1d(1), nn.Flatten()).eval()
    co = cocompile.compile(model, torch.randn(1, 4, 8))
    d = tmp_path_factory.mktemp("triton")
    artifact = str(d / "co_model.onnx")
    co.export(artifact)
    return co, artifact, write_repository(artifact, str(d / "repo"))


def test_config_parses_with_tritons_protobuf_and_lists_every_state(repo):
    co, _, folder = repo
    pb = model_config_pb2()
    cfg = text_format.Parse(open(os.path.join(folder, "config.pbtxt")).read(), pb.ModelConfig())
    assert cfg.backend == "onnxruntime" and cfg.max_batch_size > 0
    seq = cfg.sequence_batching
    assert [s.input_name for s in seq.state] == [s.name for s in co.specs]
    assert all(s.output_name == "next_" + s.input_name for s in seq.state)
    assert all(s.initial_state[0].zero_data for s in seq.state)
    control = seq.control_input[0]
    assert control.name == "START" and control.control[0].kind == pb.ModelSequenceBatching.Control.CONTROL_SEQUENCE_START
    # the model's inputs and outputs are exactly the config's plus states and START
    sess = ort.InferenceSession(os.path.join(folder, "1", "model.onnx"))
    names = {i.name for i in sess.get_inputs()}
    assert names == {i.name for i in cfg.input} | {s.input_name for s in seq.state} | {"START"}
    for state in seq.state:
        shape = next(i.shape for i in sess.get_inputs() if i.name == state.input_name)
        assert list(shape[1:]) == list(state.dims) and len(state.dims) >= 1


def test_triton_model_steps_like_the_artifact_and_restarts_on_start(repo):
    co, artifact, folder = repo
    plain = ort.InferenceSession(artifact)
    triton = ort.InferenceSession(os.path.join(folder, "1", "model.onnx"))
    state = [np.zeros([2, *s.shape], dtype=np.int64 if s.dtype == torch.int64 else np.float32)
             for s in co.specs]
    rng = np.random.default_rng(0)
    for t in range(12):
        x = rng.standard_normal((2, 4, co.step_frames)).astype(np.float32)
        feeds = {"x": x, **{s.name: v for s, v in zip(co.specs, state)}}
        ref = plain.run(None, feeds)
        feeds["state.frames"] = state[0][:, None]
        feeds["START"] = np.zeros((2, 1), np.float32)
        got = triton.run(None, feeds)
        np.testing.assert_array_equal(got[0], ref[0])
        np.testing.assert_array_equal(got[1][:, 0], ref[1])
        state = ref[1:]
    # START on stream 1: its state restarts from zero, stream 0 carries on
    x = rng.standard_normal((2, 4, co.step_frames)).astype(np.float32)
    feeds = {"x": x, **{s.name: v for s, v in zip(co.specs, state)}, "START": np.array([[0.0], [1.0]], np.float32)}
    feeds["state.frames"] = state[0][:, None]
    got = triton.run(None, feeds)
    zero = [np.zeros_like(v) for v in state]
    fresh = plain.run(None, {"x": x, **{s.name: v for s, v in zip(co.specs, zero)}})
    carried = plain.run(None, {"x": x, **{s.name: v for s, v in zip(co.specs, state)}})
    np.testing.assert_array_equal(got[0][1], fresh[0][1])
    np.testing.assert_array_equal(got[0][0], carried[0][0])
    assert got[1][1, 0] == co.step_frames and got[1][0, 0] == 13 * co.step_frames
