"""Inductor: the AOTInductor package (`co.export("x.aoti.pt2")`) from Python and from the C++ runner
(examples/aoti_runner), and the just-in-time compiled step (`co.compiled()`), each against the
eager `co.step` (E4: 1e-5 relative, every output and next state, 3·T steps, 2 streams).

The commands and code of docs/deployment.md's "AOTInductor (C++)" section run as written, in a
temporary folder holding a copy of examples/: the package and the runner are built once per
session, by those commands.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import cocompile
from cocompile import metadata as md
from cocompile.export import _rel, check_artifact, example_args
from cocompile.loading import load_artifact

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples", "aoti_runner"))
sys.path.insert(0, os.path.join(ROOT, "examples"))
import tcn  # noqa: E402
from check import runner_error  # noqa: E402

DOC = open(os.path.join(ROOT, "docs", "deployment.md")).read()
SECTION = DOC.split("## AOTInductor (C++)", 1)[1].split("\n## ", 1)[0]
BASH = re.findall(r"```bash\n(.*?)```", SECTION, re.S)
PYTHON = re.findall(r"```python\n(.*?)```", SECTION, re.S)
PACKAGE, STREAMS, BOUND = "co_tcn.aoti.pt2", 2, 1e-5
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1",
           PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))


def _no_cpp_toolchain() -> str | None:
    """Why the C++ runner cannot be built here (None when cmake and a C++ compiler are found)."""
    if shutil.which("cmake") is None:
        return "cmake is not installed"
    compilers = [os.environ.get("CXX", ""), "c++", "g++", "clang++"]
    return None if any(c and shutil.which(c) for c in compilers) else "no C++ compiler found"


def run_commands(block: str, folder) -> None:
    """Each line of a documented bash block, in `folder`, as a reader types it."""
    for command in (c.strip() for c in block.strip().splitlines()):
        run = subprocess.run(command, shell=True, cwd=folder, env=ENV, capture_output=True,
                             text=True, timeout=600)
        assert run.returncode == 0, command + "\n" + run.stdout[-3000:] + run.stderr[-3000:]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The doc's first commands run: the package of the small TCN, and the runner's frames."""
    tmp = tmp_path_factory.mktemp("deployment")
    shutil.copytree(os.path.join(ROOT, "examples"), tmp / "examples",
                    ignore=shutil.ignore_patterns("__pycache__"))
    run_commands(BASH[0], tmp)
    return tmp


@pytest.fixture(scope="module")
def co():
    """The continual model of the TCN the documented command compiles (same factory, same clip
    shape): the oracle the package is checked against."""
    return cocompile.compile(tcn.build("small"), tcn.example_input("small"), time_dim=2,
                             verify=False)        # E1 is the CLI's to check here; E4 is ours


def test_the_section_documents_package_runner_and_both_python_uses():
    assert len(BASH) == 2 and len(PYTHON) == 2
    assert f"--out {PACKAGE}" in BASH[0] and "cmake --build" in BASH[1] and "aoti_runner " in BASH[1]
    assert "aoti_load_package" in PYTHON[0] and "co.compiled()" in PYTHON[1]


def test_package_from_python_reproduces_the_step(folder, co):
    """E4 through load_artifact (torch._inductor.aoti_load_package) over 3·T steps, 2 streams, and
    the package carries the metadata every artifact carries."""
    report = check_artifact(co, str(folder / PACKAGE), batch=STREAMS)
    assert report.steps >= 3 * co.clip_length and report.batch == STREAMS
    assert report.bound == BOUND and report.passed, report
    assert load_artifact(str(folder / PACKAGE)).meta == json.loads(md.dumps(co))


def test_package_serves_any_batch_and_strided_chunks(folder, co):
    """The batch axis is dynamic; a chunk sliced out of a clip (not contiguous) steps right."""
    run = load_artifact(str(folder / PACKAGE)).run
    for batch in (1, 3):
        state = example_args(co, batch, seed=batch)[1:]              # a random state
        (clip,) = co.example_inputs(batch, frames=4 * co.step_frames)
        chunk = clip[..., co.step_frames:2 * co.step_frames]
        assert not chunk.is_contiguous()
        want = co.program(chunk, *state)
        got = run(chunk, *state)
        assert max(_rel(g, w) for g, w in zip(got, want)) <= BOUND, batch


def test_documented_python_steps_the_package(folder, monkeypatch):
    monkeypatch.chdir(folder)
    scope = {}
    exec(PYTHON[0], scope)
    assert len(scope["y"]) == 2 and scope["y"][0].shape[0] == 2


@pytest.mark.skipif(_no_cpp_toolchain() is not None, reason=str(_no_cpp_toolchain()))
def test_cpp_runner_reproduces_the_step(folder, co):
    """The documented build and run of examples/aoti_runner; its outputs and next states, every
    step, against co.step on the same frames from the zero state (E4)."""
    run_commands(BASH[1], folder)
    steps = 3 * co.clip_length                    # the frames the documented command writes
    error = runner_error(co, str(folder / "frames.bin"), str(folder / "outputs.bin"), steps, STREAMS)
    assert error <= BOUND, error


def test_compiled_step_reproduces_the_step(monkeypatch):
    """The documented `co.compiled()` code, then E4 of its step against co.step over 3·T steps
    of 2 streams, with no compile after the first step (the fed-back state keeps its layout)."""
    scope = {}
    exec(PYTHON[1], scope)
    co, fast = scope["co"], scope["fast"]
    compiles = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    g = torch.Generator().manual_seed(0)
    ref = got = co.initial_state(STREAMS)
    worst = 0.0
    for _ in range(3 * co.clip_length):
        x = torch.randn(STREAMS, 8, co.step_frames, generator=g)
        (y_ref, ref), (y, got) = co.step(x, ref), fast.step(x, got)
        worst = max(worst, *(_rel(a, b) for a, b in zip((y, *got), (y_ref, *ref))))
    assert worst <= BOUND, worst
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == compiles
    assert len(fast.graphs) == 1 and co.compiled() is fast
