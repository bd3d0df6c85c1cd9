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
NOT_WRITTEN_BY_COMMANDS = {".git", "__pycache__", ".pytest_cache", ".hypothesis"}   # git, python, pytest
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


def named_folders(command: str) -> list[str]:
    """The repository's top-level folders that paths in `command` lie in (`examples/tcn.py:build`
    -> examples)."""
    paths = [t.split(":")[0] for t in shlex.split(command)]
    return sorted({p.split("/")[0] for p in paths if "/" in p and os.path.exists(os.path.join(ROOT, p))})


def copy_named_folders(command: str, dest) -> None:
    """Copy the folders the command names into `dest`, so the command finds there what it reads."""
    for top in named_folders(command):
        shutil.copytree(os.path.join(ROOT, top), os.path.join(dest, top),
                        ignore=shutil.ignore_patterns("__pycache__"))


def snapshot(root: str, folders=()) -> dict:
    """{relative path: (size, mtime) of a file, None for a folder}: what a command run from `root`
    or from a copy of `folders` would write to by mistake (the entries at the top of `root`, and
    every file under `folders`), outside git's and pytest's own folders."""
    entries = {n: None if os.path.isdir(os.path.join(root, n)) else _stat(os.path.join(root, n))
               for n in os.listdir(root) if n not in NOT_WRITTEN_BY_COMMANDS}
    for folder in folders:
        for here, dirs, names in os.walk(os.path.join(root, folder)):
            dirs[:] = [d for d in dirs if d not in NOT_WRITTEN_BY_COMMANDS]
            entries.update({os.path.relpath(os.path.join(here, n), root): _stat(os.path.join(here, n))
                            for n in names})
    return entries


def _stat(path: str) -> tuple:
    st = os.lstat(path)
    return st.st_size, st.st_mtime_ns


def tracked(root: str) -> frozenset:
    """Files git tracks under `root` (none outside a git checkout)."""
    run = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True)
    return frozenset(run.stdout.splitlines()) if run.returncode == 0 else frozenset()


def changed(before: dict, after: dict, kept=frozenset()) -> list[str]:
    """Entries added or deleted between two snapshots, and files rewritten other than `kept`
    (tracked sources, which people edit while tests run; a command's outputs are untracked)."""
    return sorted(p for p in before.keys() | after.keys() if (p in before) != (p in after)
                  or (p not in kept and before[p] != after[p]))


def test_readme_has_the_two_setup_commands():
    setup = README.split("## Set up", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)```", setup, re.S)
    assert len(commands) == 2
    assert commands[1].strip() == TEST_COMMAND
    assert "pip install torch==2.13.0" in commands[0] and "pip install -e '.[test]'" in commands[0]
    assert "--out co_tcn.onnx" in commands[0]


def test_install_steps_are_left_out_and_writes_are_caught(tmp_path):
    """The helpers the README tests rely on: install steps go and the rest stays; a file added or
    deleted at the top or under a named folder shows in `changed`, and so does a rewritten file
    unless it is a kept (tracked) one."""
    assert _commands() and not any("pip install" in c for c in _commands())
    assert named_folders("cocompile examples/tcn.py:build --out co.onnx") == ["examples"]
    for name in ("README.md", "out.onnx", "gone.txt", "src/kept.py", "src/deep/old.bin"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("a")
    before = snapshot(str(tmp_path), ["src"])
    (tmp_path / "README.md").write_text("edited by a person meanwhile")
    (tmp_path / "out.onnx").write_text("overwritten by a command")
    (tmp_path / "gone.txt").unlink()
    (tmp_path / "new.onnx").write_text("b")
    (tmp_path / "src" / "deep" / "new.bin").write_text("c")
    (tmp_path / "src" / "kept.py").write_text("edited too")
    got = changed(before, snapshot(str(tmp_path), ["src"]), kept={"README.md", "src/kept.py"})
    assert got == ["gone.txt", "new.onnx", "out.onnx", "src/deep/new.bin"]


@pytest.mark.parametrize("command", _commands())
def test_readme_command(command, tmp_path):
    """The command succeeds in a temporary folder, writes what it names there (`--out FILE`) and
    nothing into the repository."""
    copy_named_folders(command, tmp_path)
    folders = named_folders(command)
    before = snapshot(ROOT, folders)
    run = subprocess.run(command, shell=True, cwd=tmp_path, env=ENV, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    wrote = changed(before, snapshot(ROOT, folders), tracked(ROOT))
    assert wrote == [], f"a README command wrote into the repository: {wrote}"
    for out in re.findall(r"--out (\S+)", command):
        assert (tmp_path / out).exists(), out


@pytest.mark.parametrize("code", [body for lang, body in BLOCKS if lang == "python"])
def test_readme_python(code, tmp_path):
    before = snapshot(ROOT)
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         timeout=600, env=ENV)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    wrote = changed(before, snapshot(ROOT), tracked(ROOT))
    assert wrote == [], f"a README example wrote into the repository: {wrote}"
