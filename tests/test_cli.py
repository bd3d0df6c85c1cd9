"""The `cocompile` command (docs/design.md, "CLI"): every exit path, model loading by content."""
from __future__ import annotations

import importlib
import os
import subprocess
import textwrap

import pytest
import torch

import cocompile
from cocompile import bench
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
def test_pt2_to_onnx_in_a_real_process(files, tmp_path):
    """`cocompile model.pt2 --out co_model.onnx`: exit 0, a summary, a runnable artifact."""
    out = tmp_path / "co_model.onnx"
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
    assert code == 0 and "step 4 frames" in out and "(2, 3, 16)" in out and "E1 max" not in out
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
    code, out, _ = run(["bench", files / "model.pt2", "--steps", "200", "--artifact", art], capsys)
    assert code == 0 and "clip 16 frames, step 2 frames (ideal speedup 8x)" in out
    assert "each step against the clip in the same runtime" in out
    assert "20 interleaved rounds" in out and "10 steps in a row" in out
    for name in bench.RUNTIMES:          # clip ms, step ms, and their ratio in that runtime
        line = next(ln for ln in out.splitlines() if ln.startswith(name + " "))
        clip_ms, step_ms, ratio = (float(v.rstrip("x")) for v in line.split()[1:4])
        assert abs(ratio - clip_ms / step_ms) <= 0.05 + 0.01 * ratio, line    # ms printed rounded
    assert "onnxruntime c.onnx: 200 steps" in out and "steps 181-200" in out and "interleaved" in out
    code, out, _ = run(["bench", files / "model.pt2", "--steps", "20", "--eager-only"], capsys)
    assert code == 0 and "step 2 frames" in out and "eager " in out and "TorchScript" not in out


@pytest.mark.parametrize("steps", ["0", "-3", "many"])
def test_bench_needs_a_positive_number_of_steps(files, capsys, steps):
    code, _, err = run(["bench", files / "model.pt2", "--steps", steps], capsys)
    assert code == 2 and "--steps" in err and "Traceback" not in err


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
    (["--time-dim", "5"], "--time-dim 5 is not an axis"),
    (["--step-frames", "3"], "--step-frames 3 is not a multiple of 2"),
])
def test_bad_options(files, tmp_path, capsys, argv, reason):
    base = [files / "model.pt2", "--out", tmp_path / "c.onnx"]
    code, _, err = run(base + argv, capsys)
    assert code == 2 and reason in err and "Traceback" not in err
    assert "time_dim" not in err and "step_frames" not in err      # the CLI's spelling, not Python's


FACTORIES = """
import torch
from torch import nn


def eight_channels():
    return nn.Sequential(nn.Conv1d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv1d(16, 4, 1))


class Gated(nn.Module):                 # a clip mean gates every frame: refused unless approximate
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 8, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y * torch.sigmoid(y.mean(2, keepdim=True))


def gated():
    return Gated()


def stride_one():
    return nn.Conv1d(3, 4, 3)


class TwoRates(nn.Module):             # a Fast input, a Slow one (1/2) and a side embedding
    def __init__(self):
        super().__init__()
        self.down, self.side = nn.Conv1d(3, 3, 2, stride=2), nn.Linear(5, 3)

    def forward(self, fast, slow, embedding):
        return self.down(fast) + slow + self.side(embedding).unsqueeze(-1)


def two_rates():
    return TwoRates()


class Pathways(nn.Module):             # both pathways in one list argument, as SlowFast takes them
    def forward(self, x):
        return x[0].mean(2) + x[1].mean(2)


def pathways():
    return Pathways()
"""


@pytest.fixture(scope="module")
def factories(tmp_path_factory):
    """`path/cli_factories.py:NAME` factories of small models for the error paths."""
    path = tmp_path_factory.mktemp("factories") / "cli_factories.py"
    path.write_text(FACTORIES)
    return lambda name: f"{path}:{name}"


def test_wrong_input_shape_names_the_shape(factories, tmp_path, capsys):
    """An --input-shape with 4 channels for a model whose first conv takes 8: the error names the
    shape, --input-shape and torch's reason, not torch.export's tracing advice."""
    code, _, err = run([factories("eight_channels"), "--input-shape", "1,4,32", "--out",
                        tmp_path / "c.onnx"], capsys)
    assert code == 2 and one_line_error(err), err
    assert "(1, 4, 32) from --input-shape" in err and "8 channels" in err and "got 4" in err
    assert "exportable" not in err and not (tmp_path / "c.onnx").exists()


def test_errors_name_cli_options(factories, tmp_path, capsys):
    """A refusal whose fix is `approximate=True` in Python says --approximate on the command line."""
    code, _, err = run([factories("gated"), "--input-shape", "1,3,16", "--out", tmp_path / "c.onnx"],
                       capsys)
    assert code == 2 and "fix:    compile with --approximate" in err and "approximate=True" not in err
    assert "module: " in err and "Traceback" not in err


def test_counts_are_pluralised(factories, capsys):
    code, out, _ = run(["inspect", factories("stride_one"), "--input-shape", "1,3,16"], capsys)
    assert code == 0 and "step 1 frame\n" in out and "per step of 1 frame " in out
    assert "1 frames" not in out and "frame(s)" not in out


def test_misspelt_subcommand(capsys):
    code, _, err = run(["inspct", "examples/tcn.py:build"], capsys)
    assert code == 2 and one_line_error(err), err
    assert "unknown subcommand 'inspct' (did you mean 'inspect'?)" in err
    assert "inspect, verify, bench" in err and "arguments are required" not in err


def test_usage_errors(capsys):
    assert run([], capsys)[0] == 2                          # no MODEL
    assert run(["verify", "only-one-arg"], capsys)[0] == 2
    assert run(["--help"], capsys)[0] == 0


def test_bad_file_in_a_real_process(files, tmp_path):
    bad = _bad_files(files, tmp_path)["truncated"]
    proc = subprocess.run(["cocompile", str(bad), "--out", str(tmp_path / "c.onnx")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2 and one_line_error(proc.stderr), proc.stderr


def test_one_input_shape_per_model_input(factories, tmp_path, capsys):
    """--input-shape once per input (positional arguments; one list argument for a forward() of
    one parameter), --time-dim one per input with none for a side input."""
    code, out, err = run([factories("two_rates"), "--input-shape", "1,3,8", "--input-shape", "1,3,4",
                          "--input-shape", "1,5", "--time-dim", "2,2,none", "--out", tmp_path / "c.onnx"],
                         capsys)
    assert code == 0, err
    assert "fast (1, 3, 8) time axis 2 at rate 1; slow (1, 3, 4) time axis 2 at rate 1/2; " \
           "embedding (1, 5) side input" in out and "E4" in out and " ok" in out
    assert [i.name for i in Session(str(tmp_path / "c.onnx")).inputs] == ["fast", "slow", "embedding"]
    code, out, err = run(["inspect", factories("pathways"), "--input-shape", "1,2,4",
                          "--input-shape", "1,2,16"], capsys)
    assert code == 0 and "x.0 (1, 2, 4) time axis 2 at rate 1/4" in out, err
    code, _, err = run([factories("two_rates"), "--input-shape", "1,3,8", "--input-shape", "1,3,4",
                        "--input-shape", "1,5", "--time-dim", "2,2", "--out", tmp_path / "d.onnx"], capsys)
    assert code == 2 and "does not match the structure" in err and "--time-dim" in err


def test_parse_shape():
    assert parse_shape("1x3x16") == (1, 3, 16) == parse_shape("(1, 3, 16)")
    with pytest.raises(InputError):
        parse_shape("16")
