"""Random frames for the C++ runner (examples/aoti_runner), in the layout it reads.

    python examples/aoti_runner/frames.py PACKAGE FRAMES [--steps N] [--batch B] [--seed S]

PACKAGE is a cocompile AOTInductor package (`co.export("co_model.aoti.pt2")`); its metadata names
the step's inputs. FRAMES gets, for each of N steps, each model input as a (B, ...) tensor in
C order (native byte order): standard normal frames for floating inputs, zeros for integer side
inputs (a model with side inputs wants its own values there). The runner writes its outputs the
same way, each step's outputs then next states; `read_tensors` reads either file back.

>>> write_frames("co_tcn.aoti.pt2", "frames.bin", steps=96, batch=2)
>>> read_tensors("frames.bin", [((2, 8, 1), torch.float32)])[0].shape
torch.Size([2, 8, 1])
"""
from __future__ import annotations

import argparse
import math

import torch

from cocompile.aoti import package_meta


def step_frames(meta: dict, batch: int, generator: torch.Generator) -> list[torch.Tensor]:
    """One step's model inputs for `batch` streams, from the package's metadata."""
    out = []
    for spec in meta["inputs"]:
        shape, dtype = (batch, *spec["shape"][1:]), getattr(torch, spec["dtype"])
        out.append(torch.randn(shape, generator=generator).to(dtype) if dtype.is_floating_point
                   else torch.zeros(shape, dtype=dtype))
    return out


def write_frames(package: str, path: str, steps: int, batch: int, seed: int = 0) -> None:
    """`steps` steps of random frames for `batch` streams of `package`'s inputs."""
    meta, g = package_meta(package), torch.Generator().manual_seed(seed)
    with open(path, "wb") as f:
        for _ in range(steps):
            for t in step_frames(meta, batch, g):
                f.write(_bytes(t))


def read_tensors(path: str, layout: list[tuple[tuple, torch.dtype]]) -> list[torch.Tensor]:
    """The tensors of a frames or outputs file, given each one's (shape, dtype) in file order."""
    data, out, offset = bytearray(open(path, "rb").read()), [], 0
    for shape, dtype in layout:
        n = math.prod(shape)
        out.append(torch.frombuffer(data, dtype=dtype, count=n, offset=offset).reshape(shape))
        offset += n * dtype.itemsize
    if offset != len(data):
        raise ValueError(f"{path} holds {len(data)} bytes, the layout {offset}")
    return out


def _bytes(t: torch.Tensor) -> bytes:
    """Raw C-order bytes of any dtype (bfloat16 too, which numpy lacks)."""
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


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
