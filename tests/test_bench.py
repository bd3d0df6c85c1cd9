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


# -- roofline and many streams (tiny sizes, no timed assertions) -----------------------------------
def test_roofline_counts_flops_weights_and_state(setup):
    """The bound is max(FLOPs / peak, (weights + 2 x state) / bandwidth), from what one step
    runs: its FLOPs as torch's counter sees them, every weight once, the state's bytes."""
    from torch.utils.flop_counter import FlopCounterMode

    model, clip, co, _, _ = setup
    machine = bench.Machine(flops=1e9, bandwidth=4e8)
    r = bench.roofline(co, machine, batch=2)
    state = co.initial_state(2)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        co.step(torch.randn(2, 3, co.step_frames), state)
    assert r.flops == counter.get_total_flops() > 0
    assert r.state_bytes == sum(t.nbytes for t in state)
    assert r.weight_bytes == sum(p.nbytes for p in model.parameters())
    assert r.bytes == r.weight_bytes + 2 * r.state_bytes
    assert r.bound == max(r.flops / 1e9, r.bytes / 4e8)
    assert r.limit == ("compute" if r.flops / 1e9 >= r.bytes / 4e8 else "memory")
    assert r.share(3 * r.bound) == pytest.approx(3.0) and bench.bound_cell(r, 3 * r.bound) == "3.0x"
    assert "MFLOPs" in str(r) and r.limit in str(r)


def test_machine_is_measured():
    m = bench.measure_machine(size=128, megabytes=2, repeats=1)
    assert 0 < m.flops < float("inf") and 0 < m.bandwidth < float("inf") and m.threads == 1


def test_streams_step_in_one_batched_call(setup):
    """Every stream count gets a row per runtime; the derived numbers follow from the timings."""
    model, clip, co, _, folder = setup
    rows = bench.measure_streams(model, clip, co, (1, 3), rounds=1, folder=str(folder))
    assert [(r.runtime, r.streams) for r in rows] == [("eager", 1), ("eager", 3)]
    for r in rows:
        assert r.step > 0 and r.clip > 0 and r.step_frames == co.step_frames
        assert r.per_stream == r.step / r.streams
        assert r.sustained(30) == pytest.approx(r.streams * co.step_frames / r.step / 30)
        assert r.clip_sustained(30) == pytest.approx(co.step_frames / (30 * r.clip))
    table = bench.streams_table(rows, 30).splitlines()
    assert len(table) == 4 and "streams at 30 fps" in table[0]


def test_cli_bench_streams(setup, tmp_path, capsys):
    """`cocompile bench MODEL --streams 1,2 --eager-only`: the streams table; --streams 0 is a
    usage error."""
    from cocompile.cli import main

    model, clip = setup[:2]
    torch.export.save(torch.export.export(model, (clip,)), tmp_path / "m.pt2")
    path = str(tmp_path / "m.pt2")
    code = main(["bench", path, "--streams", "1,2", "--eager-only", "--steps", "3", "--fps", "25"])
    out = capsys.readouterr().out
    assert code == 0 and "streams at 25 fps" in out
    assert [ln.split("|")[2].strip() for ln in out.splitlines() if ln.startswith("| eager")] == ["1", "2"]
    assert main(["bench", path, "--streams", "0"]) == 2
    assert "every number of streams must be at least 1" in capsys.readouterr().err


def test_cli_bench_dtype_compares_each_step_with_its_clip_and_the_float32_step(setup, tmp_path, capsys):
    """`cocompile bench MODEL --dtype float16 --eager-only`: a row per runtime with the float16
    clip and step and the float32 step of that runtime beside them."""
    from cocompile.cli import main

    model, clip = setup[:2]
    torch.export.save(torch.export.export(model, (clip,)), tmp_path / "m.pt2")
    code = main(["bench", str(tmp_path / "m.pt2"), "--dtype", "float16", "--eager-only", "--steps", "3"])
    out = capsys.readouterr().out
    assert code == 0 and out.startswith("float16: clip")
    (row,) = [ln.split() for ln in out.splitlines() if ln.startswith("eager")]
    clip_ms, step_ms, ref_ms = float(row[1]), float(row[2]), float(row[-2])
    # the printed ratio is float32 step over float16 step (cells rounded to their printed digits)
    assert float(row[-1].rstrip("x")) == pytest.approx(ref_ms / step_ms, rel=0.02, abs=0.01)
    assert clip_ms > 0
