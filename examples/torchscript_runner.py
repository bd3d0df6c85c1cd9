"""Run a cocompile TorchScript artifact (.pt) frame by frame, with explicit state.

    cocompile model.pt2 --out co_model.pt
    python examples/torchscript_runner.py co_model.pt [--frames 64]

The artifact is `step(x, *state) -> (*outputs, *next_state)`; everything needed to drive it is in
its extra file `cocompile.json` (see cocompile/metadata.py): the state tensors' shapes and dtypes
(all start at zero; the batch axis is the number of streams), the frames per step, the time axis,
and for each output when it becomes valid. This script needs only torch, not cocompile.

The same loop in C++ (libtorch):

    torch::jit::ExtraFilesMap extra{{"cocompile.json", ""}};
    auto step = torch::jit::load("co_model.pt", torch::kCPU, extra);
    // parse extra["cocompile.json"]: states[i].shape (null = batch), dtype; step_frames; time_axis
    std::vector<torch::jit::IValue> args{chunk};            // (batch, ..., step_frames, ...)
    for (auto& s : state) args.push_back(s);                 // zeros at the start of a stream
    auto out = step.forward(args).toTuple()->elements();     // outputs, then next states
    for (size_t i = 0; i < state.size(); ++i) state[i] = out[n_outputs + i].toTensor();
"""
from __future__ import annotations

import argparse
import json
import warnings

import torch

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16, "int64": torch.int64, "int32": torch.int32, "bool": torch.bool}


def load(path: str):
    """(step module, metadata dict) of a TorchScript artifact."""
    extra = {"cocompile.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)     # torch.jit is deprecated in 2.13
        module = torch.jit.load(path, map_location="cpu", _extra_files=extra)
    return module, json.loads(extra["cocompile.json"])


def initial_state(meta: dict, batch: int) -> list[torch.Tensor]:
    """Zeros for every state tensor (the metadata's `init` is "zeros" for all of them)."""
    return [torch.zeros((batch, *s["shape"][1:]), dtype=DTYPES[s["dtype"]]) for s in meta["states"]]


def valid_part(out: dict, value: torch.Tensor, frames_before: int, step_frames: int):
    """The valid part of one output of a step that began after `frames_before` input frames."""
    if out["kind"] == "time":
        streamed = frames_before * out["rate_num"] // out["rate_den"]
        skip = max(out["warmup"] - streamed, 0)
        n = value.shape[out["time_axis"]]
        return value.narrow(out["time_axis"], skip, n - skip) if skip < n else None
    if out["kind"] == "clip":
        return value if frames_before + step_frames >= out["ready"] else None
    return value


def run(path: str, frames: torch.Tensor) -> list[list]:
    """Feed `frames` (batch, T, *frame_shape) one step at a time; per step, the valid outputs."""
    module, meta = load(path)
    c, axis, n_out = meta["step_frames"], meta["inputs"][0]["time_axis"], len(meta["outputs"])
    state, seen, results = initial_state(meta, frames.shape[0]), 0, []
    for start in range(0, frames.shape[1] - c + 1, c):
        chunk = frames[:, start:start + c].movedim(1, axis).contiguous()
        flat = module(chunk, *state)
        outs, state = flat[:n_out], list(flat[n_out:])
        results.append([valid_part(o, v, seen, c) for o, v in zip(meta["outputs"], outs)])
        seen += c
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", help="a .pt artifact written by cocompile")
    parser.add_argument("--frames", type=int, default=None, help="frames to stream (default 3 clips)")
    parser.add_argument("--streams", type=int, default=2, help="independent streams in the batch")
    args = parser.parse_args(argv)
    _, meta = load(args.artifact)
    x = meta["inputs"][0]
    frame_shape = [s for i, s in enumerate(x["shape"]) if i not in (0, x["time_axis"])]
    n = args.frames or 3 * meta["clip_length"]
    frames = torch.randn(args.streams, n, *frame_shape, dtype=DTYPES[x["dtype"]])
    results = run(args.artifact, frames)
    for out_i, out in enumerate(meta["outputs"]):
        first = next((k for k, r in enumerate(results) if r[out_i] is not None), None)
        print(f"{out['name']}: {out['kind']}, first valid at step {first} of {len(results)}")
    return results


if __name__ == "__main__":
    main()
