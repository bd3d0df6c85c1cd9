"""What every example shares: random BatchNorm statistics, and compile + verify + report."""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

import torch

import cocompile
from flops import FlopCount, cocompile_flops


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights that keep activations near unit scale (He init on fan-in, which is also right
    for depthwise convs), and random BatchNorm running statistics and affine parameters, so that
    folding, skipping or misaligning a BatchNorm shows up in the outputs. Returns the eval model.

    >>> model = randomize(torch.nn.Sequential(torch.nn.Conv1d(3, 8, 3), torch.nn.BatchNorm1d(8)))
    """
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear,
                          torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)):
            torch.nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                torch.nn.init.normal_(m.bias, std=0.1)
        elif isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(0.1 * torch.randn(n))
            m.running_var.copy_(0.5 + torch.rand(n))
            m.weight.data.copy_(0.5 + 0.5 * torch.rand(n))
            m.bias.data.copy_(0.1 * torch.randn(n))
    return model.eval()


def video_clip(cfg: dict, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """A random clip (N, 3, T, H, W) of the size a video config names (frames, crop)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, cfg["frames"], cfg["crop"], cfg["crop"], generator=g)


@dataclass
class Result:
    """One compiled example: the continual model, its verify report and its FLOPs."""

    name: str
    model: torch.nn.Module
    clip: torch.Tensor
    co: cocompile.ContinualModel
    report: cocompile.Report
    flops: FlopCount
    out_scale: float          # max |model(clip)|: the E1 bound is 1e-4 * max(1, out_scale)


def state_bytes(co) -> int:
    """Bytes of state per stream (batch 1)."""
    return sum(math.prod(s.shape) * s.dtype.itemsize for s in co.specs)


def run(name: str, model, clip, time_dim: int = 2, approximate: bool = False) -> Result:
    """Compile `model` for streaming, verify it against itself on `clip`, count FLOPs, print a summary."""
    t0 = time.perf_counter()
    co = cocompile.compile(model, clip, time_dim=time_dim, approximate=approximate)
    t1 = time.perf_counter()
    report = cocompile.verify(model, co, clip)
    flops = cocompile_flops(model, co, clip)
    with torch.no_grad():
        outs = model(*co.inputs.args(clip))
        scale = max(float(y.abs().max()) for y in torch.utils._pytree.tree_leaves(outs))
    shapes = " ".join(str(tuple(t.shape)) for t in torch.utils._pytree.tree_leaves(clip))
    print(f"== {name}  input {shapes}  (compile {t1 - t0:.1f}s, verify + FLOPs "
          f"{time.perf_counter() - t1:.1f}s)")
    print(f"step_frames {co.step_frames}  clip_length {co.clip_length}  delay {co.delay}  "
          f"receptive field {co.receptive_field}")
    print(f"states {len(co.specs)}  ({state_bytes(co) / 1024:.1f} KiB per stream)")
    kind = "approximate (measured)" if report.approximate else "exact"
    print(f"E1 max |err| {report.max_error('E1'):.3g}  ({kind}; max |output| {scale:.3g})")
    print(f"FLOPs per clip {flops.clip / 1e6:.2f} M, per step {flops.step / 1e6:.2f} M, "
          f"ideal {flops.ideal / 1e6:.2f} M, ratio {flops.ratio:.3f}")
    print(report)
    return Result(name, model, clip, co, report, flops, scale)


def parse_size(argv=None, doc: str = "", sizes=("small", "full")) -> str:
    """`--size small|full` (or one of `sizes`) from the command line (default small)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None)
    parser.add_argument("--size", choices=tuple(sizes), default="small")
    return parser.parse_args(argv).size
