"""cocompile vs continual-inference on the same 3-layer 3D conv stack and the same weights.

    python examples/bench_conv_stack.py [--size small|full] [--steps N]

"full" is the stack of the continual-inference comparison: three 3x3x3 convs (padding 1, ReLU
between), 32 channels, 56x56 frames, T=16. One thread, batch 1. Printed side by side from one run,
timed interleaved (one call of each in turn per round, median over rounds, so that the machine's
drift hits all alike): re-running the clip, continual-inference's `forward_step`, cocompile's eager
step and its ONNX artifact in onnxruntime; FLOPs per step vs per clip, state bytes, compile time.

Conventions (checked numerically below): both libraries start from zero state, which stands for the
zero padding before the clip, and both emit the offline output frame t-3 at input frame t (each
padded conv delays by its one frame of right padding); continual-inference returns None for the
first 3 steps, cocompile's stateful call too. Without `continual-inference` installed
(pip install 'cocompile[bench]') its columns are skipped.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time

import torch
from torch import nn

import cocompile
from flops import count_flops

SIZES = {"full": dict(channels=32, crop=56, frames=16), "small": dict(channels=8, crop=16, frames=8)}


def build(channels: int, seed: int = 0) -> nn.Sequential:
    """The offline stack: three padded 3x3x3 convs with ReLU between."""
    torch.manual_seed(seed)
    layers = []
    for i in range(3):
        layers += [nn.Conv3d(channels, channels, 3, padding=1)] + ([nn.ReLU()] if i < 2 else [])
    return nn.Sequential(*layers).eval()


def example_input(size: str = "full") -> torch.Tensor:
    cfg = SIZES[size]
    return torch.randn(1, cfg["channels"], cfg["frames"], cfg["crop"], cfg["crop"],
                       generator=torch.Generator().manual_seed(0))


def full():
    """Factory for `cocompile bench examples/bench_conv_stack.py:full` (model, example clip)."""
    return build(SIZES["full"]["channels"]), example_input("full")


def continual_twin(model: nn.Sequential):
    """The same stack as continual-inference modules with the same weights, or None if missing."""
    try:
        import continual as co
    except ImportError:
        return None
    layers = []
    for m in model:
        if isinstance(m, nn.Conv3d):
            c = co.Conv3d(m.in_channels, m.out_channels, m.kernel_size, padding=m.padding)
            c.load_state_dict(m.state_dict())
            layers.append(c)
        else:
            layers.append(nn.ReLU())
    return co.Sequential(*layers).eval()


# -- timing ---------------------------------------------------------------------------------------
def interleaved(fns: dict, rounds: int) -> dict:
    """{name: median seconds per call}: every round calls each fn once, in turn, after one
    warm-up call; a fn that runs several steps per call (Stepper's `burst`) is timed per step."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - t0) / getattr(fn, "burst", 1))
    return {k: statistics.median(v) for k, v in times.items()}


class Stepper:
    """Calls `burst` steps per call (one stream's steps in a row), carrying the state, over the
    frames of a clip in a loop."""

    def __init__(self, step, state, frames, burst: int = 1):
        self.step, self.state, self.frames, self.i, self.burst = step, state, frames, 0, burst

    def __call__(self):
        for _ in range(self.burst):
            self.state = self.step(self.frames[self.i % len(self.frames)], self.state)
            self.i += 1


def runners(model, twin, co, onnx_path, clip) -> dict:
    """The step (or clip) functions to time, each on its own state."""
    frames = list(clip.unbind(2))
    chunks = [f.unsqueeze(2) for f in frames]
    fns = {"clip": lambda: model(clip)}
    if twin is not None:
        twin.clean_state()
        fns["continual-inference"] = Stepper(lambda x, s: twin.forward_step(x), None, frames)
    fns["cocompile eager"] = Stepper(lambda x, s: co.step(x, s)[1], co.initial_state(1), chunks)
    if onnx_path is not None:
        from cocompile.runtime import Session
        sess = Session(onnx_path, threads=1)
        np_chunks = [c.numpy() for c in chunks]
        fns["cocompile onnxruntime"] = Stepper(lambda x, s: sess.step(x, s)[1], sess.initial_state(1),
                                               np_chunks)
    return fns


# -- numbers --------------------------------------------------------------------------------------
def agreement(model, twin, co, clip) -> dict:
    """Max |difference| of the per-step outputs: continual-inference vs cocompile vs the model."""
    with torch.no_grad():
        ref = model(clip)
        co.reset()
        mine = [co(clip.narrow(2, t, 1)) for t in range(clip.shape[2])]
        out = {"cocompile vs model": _max_diff([m for m in mine if m is not None], ref)}
        if twin is not None:
            twin.clean_state()
            theirs = [twin.forward_step(clip[:, :, t]) for t in range(clip.shape[2])]
            valid = [t.unsqueeze(2) for t in theirs if t is not None]
            out["continual-inference vs model"] = _max_diff(valid, ref)
            both = [(a, b) for a, b in zip(mine, theirs) if a is not None and b is not None]
            mismatch = sum((a is None) != (b is None) for a, b in zip(mine, theirs))
            out["steps valid in one and not the other"] = mismatch
            out["continual-inference vs cocompile"] = max(float((a.squeeze(2) - b).abs().max())
                                                          for a, b in both)
    return out


def _max_diff(steps, ref) -> float:
    got = torch.cat(steps, 2)
    return float((got - ref.narrow(2, 0, got.shape[2])).abs().max())


def state_bytes_twin(twin, clip) -> int:
    """Bytes of continual-inference's state (partial sums and indices) once every layer has one."""
    twin.clean_state()
    with torch.no_grad():
        for frame in clip.unbind(2):
            twin.forward_step(frame)
    return sum(t.numel() * t.element_size() for m in twin.modules() if hasattr(m, "get_state")
               and m is not twin and m.get_state() is not None for t in m.get_state())


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--steps", type=int, default=50, help="timing rounds (default 50)")
    parser.add_argument("--no-onnx", action="store_true", help="skip the onnxruntime column")
    args = parser.parse_args(argv)
    cfg = SIZES[args.size]
    torch.set_num_threads(1)
    model, clip = build(cfg["channels"]), example_input(args.size)
    t0 = time.perf_counter()
    co = cocompile.compile(model, clip, time_dim=2)
    compile_s = time.perf_counter() - t0
    twin = continual_twin(model)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = None if args.no_onnx else str(co.export(os.path.join(tmp, "stack.onnx")))
        with torch.no_grad():
            times = interleaved(runners(model, twin, co, onnx_path, clip), args.steps)
    result = {"times": times, "compile_s": compile_s, "agreement": agreement(model, twin, co, clip),
              "flops": flops(model, twin, co, clip), "forms": forms(co),
              "state_bytes": {"cocompile": sum(math.prod(s.shape) * s.dtype.itemsize for s in co.specs)}}
    if twin is not None:
        result["state_bytes"]["continual-inference"] = state_bytes_twin(twin, clip)
    print(report(result, cfg, twin is not None))
    return result


def flops(model, twin, co, clip) -> dict:
    out = {"clip": count_flops(model, clip),
           "cocompile step": count_flops(co.step, clip.narrow(2, 0, 1), co.initial_state(1))}
    if twin is not None:
        twin.clean_state()
        out["continual-inference step"] = count_flops(twin.forward_step, clip[:, :, 0])
    return out


def forms(co) -> list[str]:
    """The step form cocompile chose for each conv, with its measured ms per form."""
    from cocompile.ops.conv_forms import FORM_META
    rows = []
    for n in co.program.gm.graph.nodes:
        if FORM_META in n.meta:
            f = n.meta[FORM_META]
            ms = ", ".join(f"{k} {v:.2f} ms" for k, v in f.ms.items())
            rows.append(f"{n.name}: {f.name} ({f.how}{'; ' + ms if ms else ''})")
    return rows


def report(r: dict, cfg: dict, have_twin: bool) -> str:
    t, T = r["times"], cfg["frames"]
    lines = [f"3-layer conv stack: {cfg['channels']} channels, {cfg['crop']}x{cfg['crop']}, T={T}, "
             f"3x3x3 kernels; 1 thread, batch 1; cocompile compile {r['compile_s']:.2f} s"]
    if not have_twin:
        lines.append("continual-inference is not installed (pip install 'cocompile[bench]'): "
                     "skipping its step, FLOPs, state and agreement")
    lines.append(f"{'':<26}{'ms':>10}{'clip / this':>13}")
    for k, v in t.items():
        lines.append(f"{k:<26}{v * 1e3:>10.3f}{t['clip'] / v:>13.2f}")
    if have_twin:
        lines.append(f"cocompile eager / continual-inference forward_step: "
                     f"{t['cocompile eager'] / t['continual-inference']:.3f}")
    if "cocompile onnxruntime" in t:
        ratio = t["cocompile onnxruntime"] / t["cocompile eager"]
        lines.append(f"cocompile onnxruntime / eager: {ratio:.3f}")
    f = r["flops"]
    lines.append(f"FLOPs: clip {f['clip'] / 1e9:.3f} G, ideal per frame {f['clip'] / T / 1e9:.3f} G")
    lines += [f"FLOPs: {k} {v / 1e9:.3f} G ({v * T / f['clip']:.3f} of ideal)"
              for k, v in f.items() if k != "clip"]
    lines += [f"state bytes per stream: {k} {v:,}" for k, v in r["state_bytes"].items()]
    lines += [f"max |diff| {k}: {v:.3g}" for k, v in r["agreement"].items()]
    lines += ["cocompile step forms: " + "; ".join(r["forms"])]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
