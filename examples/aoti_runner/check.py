"""E4 of an example's AOTInductor package, from Python and from the C++ runner, with its times.

    python examples/aoti_runner/check.py EXAMPLE [--size small|full] [--runner PATH] [--batch B]

Compiles examples/EXAMPLE.py (tcn, x3d, slow_resnet, ...) at --size, writes its step as
`EXAMPLE.aoti.pt2` in a temporary folder, and checks E4 (every output and next state within
1e-5 relative of the eager `co.step`, 3·T steps from the zero state, B streams): from Python
(`cocompile.export.check_artifact`, through `torch._inductor.aoti_load_package`) and, given the
runner built as in docs/deployment.md, from C++ on frames written by frames.py.

>>> errors = check("tcn", "small", runner="aoti_build/aoti_runner")
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch
from torch.utils import _pytree as pytree

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))            # examples/: the example modules

import cocompile  # noqa: E402
from cocompile.export import _rel, check_artifact  # noqa: E402
from frames import read_arrays, write_frames  # noqa: E402


def eager_steps(co, frames: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Per step: the eager step's outputs, then its next states, from the zero state."""
    first = pytree.tree_leaves(frames[0])[0]
    state, out = co.initial_state(first.shape[co.inputs.specs[0].batch_dim]), []
    with torch.no_grad():
        for x in frames:
            outs, state = co.step(x, state)
            out.append([*pytree.tree_leaves(outs), *state])
    return out


def runner_error(co, frames_path: str, outputs_path: str, steps: int, batch: int) -> float:
    """Largest error of the runner's outputs and next states (all steps) against `co.step` on the
    same frames, relative to max(1, max|ref|) per tensor, as E4 measures it."""
    inputs = [(tuple(s.chunk_shape(batch, co.step_frames)),
               _name(co.dtype if s.dtype.is_floating_point else s.dtype)) for s in co.inputs.specs]
    frames = [torch.from_numpy(a.copy()) for a in read_arrays(frames_path, inputs * steps)]
    n = len(inputs)
    ref = eager_steps(co, [co.inputs.unflatten(frames[i:i + n]) for i in range(0, len(frames), n)])
    flat = [t for step in ref for t in step]
    got = read_arrays(outputs_path, [(tuple(t.shape), _name(t.dtype)) for t in flat])
    return max(_rel(torch.from_numpy(g.copy()), w) for g, w in zip(got, flat))


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")         # numpy's spelling: float32, int64


def check(name: str, size: str, runner: str | None = None, batch: int = 2) -> dict:
    """Compile, export, E4 from Python (and from C++ with `runner`); prints and returns the
    errors and times."""
    ex = __import__(name)
    model, clip = ex.build(size), ex.example_input(size)
    out, t0 = {}, time.perf_counter()
    co = cocompile.compile(model, clip, time_dim=ex.TIME_DIM)
    out["compile_s"], t1 = time.perf_counter() - t0, time.perf_counter()
    steps = 3 * co.clip_length
    with tempfile.TemporaryDirectory() as tmp:
        package = co.export(os.path.join(tmp, f"{name}.aoti.pt2"))
        out["export_s"] = time.perf_counter() - t1
        report = check_artifact(co, package, steps, batch)
        out["python_e4"] = report.error
        print(f"{name} ({size}): compile {out['compile_s']:.1f} s, AOTInductor package "
              f"{out['export_s']:.1f} s ({os.path.getsize(package) / 2**20:.1f} MiB)\n  Python: {report}")
        if runner:
            frames, outputs = os.path.join(tmp, "frames.bin"), os.path.join(tmp, "outputs.bin")
            write_frames(package, frames, steps, batch)
            t2 = time.perf_counter()
            subprocess.run([runner, package, frames, str(batch), outputs], check=True)
            out["runner_s"] = time.perf_counter() - t2
            out["cpp_e4"] = runner_error(co, frames, outputs, steps, batch)
            verdict = "ok" if out["cpp_e4"] <= report.bound else "FAIL"
            print(f"  C++:    {steps} steps x {batch} streams, max rel err {out['cpp_e4']:.3g} "
                  f"(bound {report.bound:.3g}; runner {out['runner_s']:.1f} s)  {verdict}")
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("example")
    p.add_argument("--size", default="small")
    p.add_argument("--runner", help="the built examples/aoti_runner executable")
    p.add_argument("--batch", type=int, default=2)
    args = p.parse_args(argv)
    return check(args.example, args.size, args.runner and os.path.abspath(args.runner), args.batch)


if __name__ == "__main__":
    main()
