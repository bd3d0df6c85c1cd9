"""Random frames for the C++ runner (examples/aoti_runner), in the layout it reads; numpy only.

    python examples/aoti_runner/frames.py PACKAGE FRAMES [--steps N] [--batch B] [--seed S]

PACKAGE is a cocompile AOTInductor package (`co.export("co_model.aoti.pt2")`); its metadata names
the step's inputs. FRAMES gets, for each of N steps, each model input as a (B, ...) array in
C order (native byte order): standard normal frames for floating inputs, zeros for integer side
inputs (a model with side inputs wants its own values there). The runner writes its outputs the
same way, each step's outputs then next states; `read_arrays` reads either file back.

>>> write_frames("co_tcn.aoti.pt2", "frames.bin", steps=96, batch=2)
>>> read_arrays("frames.bin", [((2, 8, 1), "float32")])[0].shape
(2, 8, 1)
"""
from __future__ import annotations

import argparse
import json
import math
import zipfile

import numpy as np

MARK, KEY = "data/aotinductor/", "cocompile"      # where a package keeps its model; the JSON's key


def package_meta(path: str) -> dict:
    """The cocompile metadata of a package, read from the zip without loading its library."""
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            if MARK in name and name.endswith("wrapper_metadata.json"):
                text = json.loads(archive.read(name)).get(KEY)
                if text:
                    return json.loads(text)
    raise ValueError(f"{path} has no cocompile metadata: not written by cocompile")


def step_frames(meta: dict, batch: int, rng: np.random.Generator) -> list[np.ndarray]:
    """One step's model inputs for `batch` streams, from the package's metadata."""
    out = []
    for spec in meta["inputs"]:
        shape = [batch if i == spec.get("batch_axis", 0) else d for i, d in enumerate(spec["shape"])]
        dtype = np.dtype(spec["dtype"])
        out.append(rng.standard_normal(shape).astype(dtype) if dtype.kind == "f"
                   else np.zeros(shape, dtype))
    return out


def write_frames(package: str, path: str, steps: int, batch: int, seed: int = 0) -> None:
    """`steps` steps of random frames for `batch` streams of `package`'s inputs."""
    meta, rng = package_meta(package), np.random.default_rng(seed)
    with open(path, "wb") as f:
        for _ in range(steps):
            for a in step_frames(meta, batch, rng):
                f.write(np.ascontiguousarray(a).tobytes())


def read_arrays(path: str, layout: list[tuple[tuple, str]]) -> list[np.ndarray]:
    """The arrays of a frames or outputs file, given each one's (shape, dtype) in file order."""
    data, out, offset = open(path, "rb").read(), [], 0
    for shape, dtype in layout:
        n = math.prod(shape)
        out.append(np.frombuffer(data, dtype, n, offset).reshape(shape))
        offset += n * np.dtype(dtype).itemsize
    if offset != len(data):
        raise ValueError(f"{path} holds {len(data)} bytes, the layout {offset}")
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("package")
    p.add_argument("frames")
    p.add_argument("--steps", type=int, default=96)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    write_frames(args.package, args.frames, args.steps, args.batch, args.seed)
    print(f"{args.frames}: {args.steps} steps x {args.batch} streams of {args.package}'s inputs")


if __name__ == "__main__":
    main()
