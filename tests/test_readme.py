"""The README's commands and code run as written, so the docs cannot go stale.

Each command runs in a temporary folder holding a copy of the repository folders it names (the
set-up command's `examples/tcn.py:build` reads `examples/`), so the tests leave the working tree as
they found it: an artifact the reader's own set-up run wrote stays where it is, and a test fails if
a command writes into the repository. Install steps (`pip install ...`) are not repeated: the
install that runs the tests (CI's, or the reader's own) already ran them.
"""
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md")).read()
BLOCKS = re.findall(r"```(bash|python)\n(.*?)```", README, re.S)
TEST_COMMAND = "python -m pytest -q"      # the README's test command is what CI runs
INSTALL = re.compile(r"^(python -m )?pip install\b")
NOT_WRITTEN_BY_COMMANDS = {".git", "__pycache__", ".pytest_cache", ".hypothesis"}   # pytest's own
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")


def without_installs(command: str) -> str:
    """The command less its install steps, which `&&` joins to the rest.

    >>> without_installs("pip install torch && pip install -e . && cocompile m.py:build --out a.onnx")
    'cocompile m.py:build --out a.onnx'
    """
    return " && ".join(s.strip() for s in command.split("&&") if not INSTALL.match(s.strip()))


def _commands() -> list[str]:
    out = []
    for lang, body in BLOCKS:
        if lang == "bash":
            out += [without_installs(c) for c in body.strip().splitlines()
                    if c.strip() and c.strip() != TEST_COMMAND]
    return [c for c in out if c]


def copy_named_folders(command: str, dest) -> None:
    """Copy into `dest` each top-level folder of the repository that a path in `command` lies in
    (`examples/tcn.py:build` -> examples/), so the command finds what it reads there."""
    for token in shlex.split(command):
        path = token.split(":")[0]
        if "/" in path and os.path.exists(os.path.join(ROOT, path)):
            top = path.split("/")[0]
            if not os.path.exists(os.path.join(dest, top)):
                shutil.copytree(os.path.join(ROOT, top), os.path.join(dest, top),
                                ignore=shutil.ignore_patterns("__pycache__"))


def snapshot(root: str) -> dict:
    """{relative path: (size, mtime)} of every file under `root` that a command could write
    (outside git's and pytest's own folders)."""
    files = {}
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in NOT_WRITTEN_BY_COMMANDS]
        for name in names:
            path = os.path.join(folder, name)
            st = os.lstat(path)
            files[os.path.relpath(path, root)] = (st.st_size, st.st_mtime_ns)
    return files


def changed(before: dict, after: dict) -> list[str]:
    """Files written, added or deleted between two snapshots."""
    return sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))


def test_readme_has_the_two_setup_commands():
    setup = README.split("## Set up", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)```", setup, re.S)
    assert len(commands) == 2
    assert commands[1].strip() == TEST_COMMAND
    assert "pip install torch==2.13.0" in commands[0] and "pip install -e '.[test]'" in commands[0]
    assert "--out co_tcn.onnx" in commands[0]


def test_install_steps_are_left_out_and_writes_are_caught(tmp_path):
    """The two helpers the README tests rely on: install steps go, the rest stays; a file written,
    added or deleted under a folder shows in `changed`."""
    assert _commands() and not any("pip install" in c for c in _commands())
    (tmp_path / "kept.txt").write_text("a")
    (tmp_path / "gone.txt").write_text("b")
    (tmp_path / "__pycache__").mkdir()
    before = snapshot(str(tmp_path))
    (tmp_path / "kept.txt").write_text("a longer text")
    (tmp_path / "gone.txt").unlink()
    (tmp_path / "new.onnx").write_text("c")
    (tmp_path / "__pycache__" / "x.pyc").write_text("d")
    assert changed(before, snapshot(str(tmp_path))) == ["gone.txt", "kept.txt", "new.onnx"]


@pytest.mark.parametrize("command", _commands())
def test_readme_command(command, tmp_path):
    """The command succeeds in a temporary folder, writes what it names there (`--out FILE`) and
    nothing into the repository."""
    copy_named_folders(command, tmp_path)
    before = snapshot(ROOT)
    run = subprocess.run(command, shell=True, cwd=tmp_path, env=ENV, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert changed(before, snapshot(ROOT)) == [], "a README command wrote into the repository"
    for out in re.findall(r"--out (\S+)", command):
        assert (tmp_path / out).exists(), out


@pytest.mark.parametrize("code", [body for lang, body in BLOCKS if lang == "python"])
def test_readme_python(code, tmp_path):
    before = snapshot(ROOT)
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         timeout=600, env=ENV)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert changed(before, snapshot(ROOT)) == [], "a README example wrote into the repository"
