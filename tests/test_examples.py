"""The examples are tested documentation: each one, at its small size, streams exactly what its
offline model computes (E1), the SE variant of X3D is refused unless approximate, and a step costs
no more than the frames it brings in (FLOPs within 10% of clip FLOPs * step_frames / T)."""
import functools
import importlib
import math
import os
import sys

import pytest
import torch
from torch.utils import _pytree as pytree

import cocompile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))

EXAMPLES = ["x3d", "r2plus1d", "slow_resnet", "tcn", "crnn", "kws_lstm", "unet_audio", "video_unet"]


@functools.cache
def run_example(name: str) -> dict:
    """What `python examples/<name>.py --size small` computes, run once per example."""
    return importlib.import_module(name).main(["--size", "small"])


@pytest.fixture(params=EXAMPLES)
def example(request):
    return run_example(request.param)


def _compiled(example):
    return [r for key, r in example.items() if key != "refusal"]


def test_stepping_reproduces_the_offline_model(example):
    r = example["exact"]
    assert r.report.passed and not r.report.approximate, str(r.report)
    # independent of verify(): stepping + flush against the untouched offline model
    with torch.no_grad():
        ref, got = pytree.tree_leaves(r.model(r.clip)), pytree.tree_leaves(r.co.forward_steps(r.clip))
    assert len(ref) == len(got)
    for a, b in zip(ref, got):
        assert a.shape == b.shape
        assert (a - b).abs().max() <= 1e-4 * max(1.0, float(a.abs().max()))
        assert a.abs().max() > 1e-2          # outputs are not vanishingly small: the check has teeth


def test_step_flops_match_the_frames_it_reads(example):
    for r in _compiled(example):
        assert r.flops.step > 0
        assert r.flops.ratio <= 1.1, f"{r.name}: step {r.flops.step} vs ideal {r.flops.ideal}"


def test_x3d_squeeze_excitation_needs_approximate():
    out = run_example("x3d")
    err = out["refusal"]
    assert isinstance(err, cocompile.CompileError)
    assert "blocks.0.se" in str(err) and "approximate=True" in str(err)
    r = out["approximate"]
    assert r.report.approximate and r.co.approximate
    assert math.isfinite(r.report.max_error("E1"))
    with torch.no_grad():   # the reported deviation is the real one
        real = float((r.co.forward_steps(r.clip) - r.model(r.clip)).abs().max())
    assert r.report.max_error("E1") == pytest.approx(real, rel=1e-3, abs=1e-7)
    assert not any(c.claimed for c in r.report.checks if c.name == "E1")


def test_flops_table_script(capsys):
    """`python examples/flops.py --size small --only tcn` prints every count in a unit that keeps
    its digits (a small step is not 0.0000 GFLOPs): each cell reads back within 0.1%."""
    flops = importlib.import_module("flops")
    rows = flops.main(["--size", "small", "--only", "tcn"])
    assert [label for label, _ in rows] == ["tcn"]
    f = rows[0][1]
    assert f.ratio <= 1.1 and f.step < 1e6          # small enough to print 0.0000 in GFLOPs
    line = capsys.readouterr().out.splitlines()[-1].split()
    scale = {"T": 1e12, "G": 1e9, "M": 1e6, "k": 1e3}
    cells = [float(v) * scale[u] for v, u in zip(line[3:9:2], line[4:10:2])]
    for cell, value in zip(cells, (f.clip, f.step, f.ideal)):
        assert cell == pytest.approx(value, rel=1e-3)


def test_compile_time_script(capsys):
    """`python examples/compile_time.py --size small --only tcn,conditioned_tcn`: compile and its
    own E1 check timed apart, on a model of one input and one with a side input."""
    rows = importlib.import_module("compile_time").main(["--size", "small", "--only", "tcn,conditioned_tcn"])
    assert [name for name, _, _ in rows] == ["tcn", "conditioned_tcn"]
    assert all(build > 0 and check > 0 for _, build, check in rows)
    assert "check share" in capsys.readouterr().out


@pytest.mark.parametrize("with_continual", [True, False])
def test_bench_conv_stack_script(with_continual, monkeypatch, capsys):
    """`python examples/bench_conv_stack.py --size small` runs, with continual-inference installed
    or not (then it says so and skips those columns); both libraries' steps match the model."""
    from importlib.util import find_spec
    if not with_continual:
        monkeypatch.setitem(sys.modules, "continual", None)     # import continual -> ImportError
    else:   # the test extra installs it, so the comparison itself is always checked
        assert find_spec("continual") is not None, "pip install -e '.[test]' installs continual-inference"
    bench = importlib.import_module("bench_conv_stack")
    r = bench.main(["--size", "small", "--steps", "2"])
    out = capsys.readouterr().out
    assert {"clip", "cocompile eager", "cocompile onnxruntime"} <= set(r["times"])
    assert r["agreement"]["cocompile vs model"] <= 1e-4 and r["flops"]["cocompile step"] > 0
    if with_continual:
        assert r["agreement"]["steps valid in one and not the other"] == 0
        assert r["agreement"]["continual-inference vs cocompile"] <= 1e-4
        assert "continual-inference" in r["times"] and "forward_step" in out
    else:
        assert "continual-inference is not installed" in out and "continual-inference" not in r["times"]


def test_speed_script(capsys, tmp_path, monkeypatch):
    """`python examples/speed.py --size small --only tcn --rounds 3` prints its three tables, one
    row each with every column; in every runtime the clip and the step have finite positive
    latencies, the speedup shown is that runtime's own clip over its own step, and the step's
    share of its roofline bound is its time over the bound (no timed assertion); --plot draws the
    speedups, or says that matplotlib is missing."""
    from importlib.util import find_spec

    from cocompile import bench
    speed = importlib.import_module("speed")
    png = tmp_path / "speed.png"
    rows = speed.main(["--size", "small", "--only", "tcn", "--rounds", "3", "--plot", str(png)])
    captured = capsys.readouterr()
    lines = [line for line in captured.out.splitlines() if line.startswith("|")]
    assert len(lines) == 9 and all(lines[i].startswith("| tcn |") for i in (2, 5, 8))
    for head, row, columns in ((lines[0], lines[2], speed.speedup_columns()),
                               (lines[3], lines[5], speed.latency_columns()),
                               (lines[6], lines[8], speed.roofline_columns())):
        header = [c.strip() for c in head.strip("|").split("|")]
        assert header == [h for h, _ in columns] and row.count("|") == len(header) + 1
    (r,) = rows
    assert set(r.latency) == set(bench.RUNTIMES) == set(speed.RUNTIMES)
    cells = dict(zip([h for h, _ in speed.speedup_columns()],
                     [c.strip() for c in lines[2].strip("|").split("|")]))
    for name, lat in r.latency.items():
        assert lat.why == "" and all(math.isfinite(t) and t > 0 for t in (lat.clip, lat.step))
        assert r.speedup(name) == lat.clip / lat.step and r.share(name) == r.speedup(name) / r.ideal
        assert cells[f"{name} x (of ideal)"] == f"{r.speedup(name):.1f}x ({r.share(name):.0%})"
    bound = dict(zip([h for h, _ in speed.roofline_columns()], [c.strip() for c in lines[8].strip("|").split("|")]))
    for name, lat in r.latency.items():
        assert bound[f"{name} step / roofline"] == f"{lat.step / r.bound.bound:.1f}x"
    assert r.bound.flops > 0 and r.bound.weight_bytes > 0 and r.bound.state_bytes == r.state_bytes
    assert r.ideal == r.clip_length / r.step_frames == 32
    assert 0 < r.step_flops < r.clip_flops and r.state_bytes > 0 and r.compile_s > 0
    if find_spec("matplotlib") is None:
        assert "matplotlib is not installed" in captured.err and not png.exists()
    else:
        assert png.stat().st_size > 0 and f"plot: {png}" in captured.out
    monkeypatch.setitem(sys.modules, "matplotlib", None)       # import matplotlib -> ImportError
    assert not speed.plot(rows, str(tmp_path / "none.png")) and not (tmp_path / "none.png").exists()
    assert "matplotlib is not installed" in capsys.readouterr().err
