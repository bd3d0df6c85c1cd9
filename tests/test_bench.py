"""cocompile.bench: each runtime's clip is the offline model and its step the continual model,
and a speedup divides a runtime's own clip latency by its own step latency."""
import numpy as np
import pytest
import torch
from torch import nn

import cocompile
from cocompile import bench
from cocompile.runtime import Session


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A small causal conv model, its clip, the continual model and its artifacts."""
    folder = tmp_path_factory.mktemp("bench")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv1d(8, 4, 1)).eval()
    clip = torch.randn(1, 3, 16)
    co = cocompile.compile(model, clip)
    paths = {rt.name: bench._write(co, rt, str(folder), None) for rt in bench.RUNTIMES.values()}
    return model, clip, co, paths, folder


def test_each_runtime_runs_the_offline_model_as_its_clip(setup):
    model, clip, co, _, folder = setup
    with torch.no_grad():
        ref = model(clip)
        for rt in bench.RUNTIMES.values():
            out = rt.clip(model, clip, str(folder), 1, co)()
            got = torch.as_tensor(out[0] if isinstance(out, (list, tuple)) else out)
            assert got.shape == ref.shape, rt.name
            assert (got - ref).abs().max() <= 1e-5 * max(1.0, float(ref.abs().max())), rt.name


def test_each_runtime_steps_the_continual_model(setup):
    """Every step form carries the state the eager step carries (E4's bound) over the clip."""
    _, clip, co, paths, _ = setup
    chunks = list(clip.split(co.step_frames, dim=2))
    with torch.no_grad():
        ref = co.initial_state(1)
        for c in chunks:
            ref = co.step(c, ref)[1]
        for rt in bench.RUNTIMES.values():
            form = rt.step(co, paths[rt.name], 1)
            state = form.initial_state(1)
            for c in chunks:
                state = form.call(form.convert(c), state)
            for a, b in zip(state, ref):
                assert torch.allclose(torch.as_tensor(np.asarray(a)), b, rtol=1e-5, atol=1e-5), rt.name


def test_measure_divides_each_runtimes_clip_by_its_own_step(setup, monkeypatch):
    """Runs every clip and step for real (one round), then pairs them by runtime: with the
    timings replaced by distinct numbers, each speedup is its own runtime's ratio."""
    model, clip, co, paths, folder = setup
    seen, real = {}, bench.interleaved

    def timed(calls, rounds):
        seen.update(real(calls, rounds, warmup=1))
        assert list(calls) == [f"{rt} {part}" for rt in bench.RUNTIMES for part in ("clip", "step")]
        return {k: 0.001 * (i + 1) for i, k in enumerate(calls)}

    monkeypatch.setattr(bench, "interleaved", timed)
    chunks = list(clip.split(co.step_frames, dim=2))
    lat = bench.measure(model, clip, co, chunks, rounds=1, stream=2, folder=str(folder), artifacts=paths)
    assert all(v > 0 for v in seen.values()) and len(seen) == 2 * len(bench.RUNTIMES)
    for i, name in enumerate(bench.RUNTIMES):
        clip_s, step_s = 0.001 * (2 * i + 1), 0.001 * (2 * i + 2)
        assert (lat[name].clip, lat[name].step, lat[name].why) == (clip_s, step_s, "")
        assert lat[name].speedup == pytest.approx(clip_s / step_s)
        assert lat[name].share(16) == pytest.approx(clip_s / step_s / 16)
        assert bench.ratio_cell(lat[name], 16) == f"{clip_s / step_s:.1f}x ({clip_s / step_s / 16:.0%})"


def test_a_model_that_does_not_export_says_why(setup, monkeypatch):
    model, clip, co, paths, folder = setup

    def fails(*args, **kwargs):
        raise RuntimeError("no converter for aten::mystery\nmore lines")

    monkeypatch.setattr(torch.onnx, "export", fails)
    chunks = list(clip.split(co.step_frames, dim=2))
    (lat,) = bench.measure(model, clip, co, chunks, rounds=1, stream=1, folder=str(folder),
                           runtimes=[bench.RUNTIMES["onnxruntime"]], artifacts=paths).values()
    assert lat.clip is None and lat.step > 0 and lat.speedup is None
    assert lat.why == "torch.onnx.export fails on the offline model: no converter for aten::mystery"
    assert bench.ratio_cell(lat, 16) == f"n/a ({lat.why})" and bench.ms_cell(lat.clip) == "n/a"


def test_the_clip_session_has_the_step_sessions_options(setup):
    path = setup[3]["onnxruntime"]
    for threads in (1, 2, None):
        step = Session(path, threads=threads)._sess.get_session_options()
        clip = bench.onnx_options(threads)
        for key in ("intra_op_num_threads", "inter_op_num_threads", "execution_mode",
                    "graph_optimization_level"):
            assert getattr(clip, key) == getattr(step, key), (threads, key)
