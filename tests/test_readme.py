"""The README's commands and code run as written, so the docs cannot go stale."""
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md")).read()
BLOCKS = re.findall(r"```(bash|python)\n(.*?)```", README, re.S)
TEST_COMMAND = "python -m pytest -q"      # the README's test command is what CI runs


def _commands():
    out = []
    for lang, body in BLOCKS:
        if lang == "bash":
            out += [c for c in body.strip().splitlines() if c.strip() and c.strip() != TEST_COMMAND]
    return out


def test_readme_has_the_two_setup_commands():
    setup = README.split("## Set up", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)```", setup, re.S)
    assert len(commands) == 2
    assert commands[1].strip() == TEST_COMMAND
    assert "--out co_tcn.onnx" in commands[0]


@pytest.mark.parametrize("command", _commands())
def test_readme_command(command, tmp_path, installed_package):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with installed_package(reinstall="pip install" in command):
        run = subprocess.run(command, shell=True, cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for produced in ("co_tcn.onnx", "triton_repo"):
        path = os.path.join(ROOT, produced)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


@pytest.mark.parametrize("code", [body for lang, body in BLOCKS if lang == "python"])
def test_readme_python(code, tmp_path, installed_package):
    with installed_package():
        run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                             timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
