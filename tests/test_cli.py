"""The `cocompile` command (DESIGN.md §8): every exit path, model loading by content."""
from __future__ import annotations

import importlib
import os
import subprocess
import textwrap

import pytest
import torch

import cocompile
from cocompile.cli import main, parse_shape
from cocompile.loading import InputError
from cocompile.runtime import Session
from test_export import StridedTCN

SHAPE = (1, 3, 16)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A torch.export archive, a pickled module, a state dict and a TorchScript archive of one TCN."""
    d = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    model, clip = StridedTCN().eval(), torch.randn(SHAPE)
    torch.export.save(torch.export.export(model, (clip,)), d / "model.pt2")
    torch.save(model, d / "pickled.pt")
    torch.save(model.state_dict(), d / "weights.pt")
    torch.jit.save(torch.jit.trace(model, clip), d / "scripted.pt")
    return d


def run(argv, capsys):
    """main(argv) in process: (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> bool:
    lines = [ln for ln in err.splitlines() if not ln.startswith("cocompile: warning")
             and "..." not in ln and " done in " not in ln]
    return len(lines) == 1 and lines[0].startswith("cocompile: error: ") and "Traceback" not in err


# -- success ---------------------------------------------------------------------------------------
def test_pt2_to_onnx_in_a_real_process(files, tmp_path, installed_package):
    """`cocompile model.pt2 --out co_model.onnx`: exit 0, a summary, a runnable artifact."""
    out = tmp_path / "co_model.onnx"
    with installed_package():
        proc = subprocess.run(["cocompile", str(files / "model.pt2"), "--out", str(out)],
                              capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for word in ("delay", "receptive field", "state", "FLOPs", "per step", "per clip", "exact", "E1", "E4"):
        assert word in proc.stdout, word
    assert len(proc.stdout.splitlines()) <= 24                     # one screen
    assert Session(str(out)).step_frames == 2


@pytest.mark.parametrize("fmt", [".pt", ".pt2"])
def test_torch_formats(files, tmp_path, capsys, fmt):
    code, out, _ = run([files / "model.pt2", "--out", tmp_path / f"co{fmt}"], capsys)
    assert code == 0 and "E4" in out and (tmp_path / f"co{fmt}").exists()


def test_options(files, tmp_path, capsys):
    code, out, _ = run([files / "model.pt2", "--out", tmp_path / "c.onnx", "--step-frames", "4",
                        "--time-dim", "2", "--input-shape", "2,3,16", "--no-verify"], capsys)
    assert code == 0 and "step 4 frame(s)" in out and "(2, 3, 16)" in out and "E1 max" not in out
    assert Session(str(tmp_path / "c.onnx")).step_frames == 4


def test_pickled_module_needs_trust(files, tmp_path, capsys):
    code, _, err = run([files / "pickled.pt", "--out", tmp_path / "c.onnx", "--input-shape", "1,3,16"], capsys)
    assert code == 2 and "--trust-pickle" in err and one_line_error(err)
    code, out, _ = run([files / "pickled.pt", "--out", tmp_path / "c.onnx", "--input-shape", "1,3,16",
                        "--trust-pickle"], capsys)
    assert code == 0 and "pickled module" in out


def test_factory_with_weights(files, tmp_path, capsys, monkeypatch):
    (tmp_path / "tiny_factory.py").write_text(textwrap.dedent("""
        import torch
        from test_export import StridedTCN

        def build():
            return StridedTCN()

        def build_with_example():
            return StridedTCN(), torch.randn(1, 3, 16)
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    code, out, _ = run(["tiny_factory:build", "--weights", files / "weights.pt", "--input-shape", "1,3,16",
                        "--out", tmp_path / "c.onnx"], capsys)
    assert code == 0 and "factory tiny_factory:build" in out
    code, out, _ = run(["tiny_factory:build_with_example", "--out", tmp_path / "d.onnx"], capsys)
    assert code == 0
    torch.save({"c1.weight": torch.zeros(1)}, tmp_path / "wrong.pt")
    code, _, err = run(["tiny_factory:build", "--weights", tmp_path / "wrong.pt", "--input-shape", "1,3,16",
                        "--out", tmp_path / "c.onnx"], capsys)
    assert code == 2 and "does not fit the model" in err and one_line_error(err)
    code, _, err = run(["tiny_factory:nothing", "--out", tmp_path / "c.onnx"], capsys)
    assert code == 2 and "cannot import" in err


def test_verify_artifact(files, tmp_path, capsys):
    art = tmp_path / "c.onnx"
    assert run([files / "model.pt2", "--out", art, "--no-verify"], capsys)[0] == 0
    code, out, _ = run(["verify", files / "model.pt2", art], capsys)
    assert code == 0 and "PASSED" in out and "E4" in out and " ok" in out


def test_inspect_and_bench(files, capsys, tmp_path):
    code, out, _ = run(["inspect", files / "model.pt2"], capsys)
    assert code == 0 and "FLOPs/step" in out and "c2" in out
    art = tmp_path / "c.onnx"
    assert run([files / "model.pt2", "--out", art, "--no-verify"], capsys)[0] == 0
    code, out, _ = run(["bench", files / "model.pt2", "--steps", "2000", "--artifact", art], capsys)
    assert code == 0 and "step (2 frames)" in out and "onnxruntime" in out
    assert "steps 1801-2000" in out and "interleaved" in out
    forms = next(line for line in out.splitlines() if line.startswith("step, median of 1000 interleaved"))
    assert all(f"{k} " in forms for k in ("eager", "TorchScript", "onnxruntime", "onnxruntime / eager"))
    code, out, _ = run(["bench", files / "model.pt2", "--steps", "20", "--eager-only"], capsys)
    assert code == 0 and "step (2 frames)" in out and "TorchScript" not in out


# -- exit 1 ----------------------------------------------------------------------------------------
def test_verify_fails_on_another_models_artifact(files, tmp_path, capsys):
    torch.manual_seed(1)
    other = StridedTCN().eval()
    co = cocompile.compile(other, torch.randn(SHAPE))
    art = co.export(tmp_path / "other.onnx")
    code, out, _ = run(["verify", files / "model.pt2", art], capsys)
    assert code == 1 and "FAIL" in out


def test_failed_verification_writes_nothing(files, tmp_path, capsys, monkeypatch):
    check = importlib.import_module("cocompile.verify").Check("E1", 0, 1.0, 1e-4, True)
    failing = cocompile.Report(checks=[check])
    monkeypatch.setattr(cocompile, "verify", lambda *a, **k: failing)
    code, out, err = run([files / "model.pt2", "--out", tmp_path / "c.onnx"], capsys)
    assert code == 1 and "FAILED" in out and "not written" in err
    assert not (tmp_path / "c.onnx").exists()


# -- exit 2 ----------------------------------------------------------------------------------------
def _bad_files(files, d):
    blob = (files / "model.pt2").read_bytes()
    (d / "truncated.pt2").write_bytes(blob[: len(blob) // 2])
    (d / "corrupt.pt2").write_bytes(os.urandom(4096))
    (d / "empty.pt2").write_bytes(b"")
    return {"truncated": d / "truncated.pt2", "corrupt": d / "corrupt.pt2", "empty": d / "empty.pt2",
            "missing": d / "missing.pt2", "torchscript": files / "scripted.pt",
            "state dict": files / "weights.pt", "directory": d}


@pytest.mark.parametrize("case", ["truncated", "corrupt", "empty", "missing", "torchscript",
                                  "state dict", "directory"])
def test_bad_model_files(files, tmp_path, capsys, case):
    path = _bad_files(files, tmp_path)[case]
    code, _, err = run([path, "--out", tmp_path / "c.onnx", "--input-shape", "1,3,16"], capsys)
    assert code == 2 and one_line_error(err), err
    if case == "torchscript":
        assert "TorchScript" in err and "torch.export" in err
    if case == "state dict":
        assert "--weights" in err


@pytest.mark.parametrize("argv, reason", [
    (["--input-shape", "1,3,abc"], "--input-shape"),
    (["--input-shape", "1,0,16"], "--input-shape"),
    (["--out", "c.tflite"], "unknown suffix"),
    (["--time-dim", "5"], "time_dim=5"),
    (["--step-frames", "3"], "step_frames=3"),
])
def test_bad_options(files, tmp_path, capsys, argv, reason):
    base = [files / "model.pt2", "--out", tmp_path / "c.onnx"]
    code, _, err = run(base + argv, capsys)
    assert code == 2 and reason in err and "Traceback" not in err


def test_usage_errors(capsys):
    assert run([], capsys)[0] == 2                          # no MODEL
    assert run(["verify", "only-one-arg"], capsys)[0] == 2
    assert run(["--help"], capsys)[0] == 0


def test_bad_file_in_a_real_process(files, tmp_path, installed_package):
    bad = _bad_files(files, tmp_path)["truncated"]
    with installed_package():
        proc = subprocess.run(["cocompile", str(bad), "--out", str(tmp_path / "c.onnx")],
                              capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and one_line_error(proc.stderr), proc.stderr


def test_parse_shape():
    assert parse_shape("1x3x16") == (1, 3, 16) == parse_shape("(1, 3, 16)")
    with pytest.raises(InputError):
        parse_shape("16")
