"""FLOPs of one continual step versus one offline clip, for every example.

    python examples/flops.py [--size small|full] [--only x3d tcn]

`ideal` is what a perfectly incremental model would spend per step: the clip's FLOPs times the
fraction of the clip that one step brings in (step_frames / T). A ratio near 1 means the step
recomputes nothing it has seen before; the head that runs once per step is the usual excess.
Recurrent layers count on both sides: torch.utils.flop_counter sees the offline nn.GRU / nn.LSTM
as the matrix products of their decomposition (input and hidden projections of every frame), as
it sees the step's own products.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

EXAMPLES = ("x3d", "r2plus1d", "slow_resnet", "tcn", "crnn", "kws_lstm", "unet_audio", "video_unet")


@dataclass(frozen=True)
class FlopCount:
    """FLOPs (multiply and add counted apart, as FlopCounterMode does) of a clip and of one step."""

    clip: int
    step: int
    clip_length: int
    step_frames: int

    @property
    def ideal(self) -> float:
        return self.clip * self.step_frames / self.clip_length

    @property
    def ratio(self) -> float:
        return self.step / self.ideal


def count_flops(fn, *args) -> int:
    """Total FLOPs of `fn(*args)`.

    >>> count_flops(torch.nn.Linear(4, 2), torch.randn(1, 4))
    16
    """
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)    # fused encoder kernels are not counted
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            fn(*args)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    return counter.get_total_flops()


def cocompile_flops(model: torch.nn.Module, co, clip: torch.Tensor) -> FlopCount:
    """FLOPs of `model(clip)` and of one `co.step` on the clip's first chunk from the zero state.

    Every step runs the same graph on the same shapes, so the first step is every step.

    >>> f = cocompile_flops(model, cocompile.compile(model, clip), clip)
    >>> f.ratio      # step / (clip * step_frames / T)
    1.02
    """
    leaves = co.inputs.leaves(clip)
    chunk = co.inputs.unflatten(co.inputs.window(leaves, 0, co.step_frames))
    state = co.initial_state(leaves[0].shape[0])
    return FlopCount(clip=count_flops(model, *co.inputs.args(clip)), step=count_flops(co.step, chunk, state),
                     clip_length=co.clip_length, step_frames=co.step_frames)


def import_example(name: str):
    """Import examples/<name>.py whether or not examples/ is on sys.path."""
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    return importlib.import_module(name)


def table(size: str, names=EXAMPLES) -> list[tuple[str, FlopCount]]:
    """Compile every example (and X3D's SE variant, approximate) at `size` and count its FLOPs."""
    import cocompile

    rows = []
    for name in names:
        mod = import_example(name)
        for label, kwargs, approximate in mod.VARIANTS:
            model, clip = mod.build(size, **kwargs), mod.example_input(size)
            co = cocompile.compile(model, clip, time_dim=mod.TIME_DIM, approximate=approximate)
            rows.append((label, cocompile_flops(model, co, clip)))
    return rows


def format_flops(n: float) -> str:
    """FLOPs with four significant digits in the unit that fits their size.

    >>> format_flops(94_480_000), format_flops(756), format_flops(9.591e9)
    ('94.48 M', '756', '9.591 G')
    """
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.4g} {unit}"
    return f"{n:.4g}"


def format_table(rows) -> str:
    """The FLOPs table as text; each count in the unit that fits it (G, M, k)."""
    head = f"{'model':<16}{'T':>5}{'step':>6}{'clip FLOPs':>13}{'step FLOPs':>13}{'ideal FLOPs':>13}{'ratio':>8}"
    lines = [head, "-" * len(head)]
    for label, f in rows:
        lines.append(f"{label:<16}{f.clip_length:>5}{f.step_frames:>6}{format_flops(f.clip):>13}"
                     f"{format_flops(f.step):>13}{format_flops(f.ideal):>13}{f.ratio:>8.3f}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("small", "full"), default="full")
    parser.add_argument("--only", nargs="*", default=list(EXAMPLES), help="examples to count")
    args = parser.parse_args(argv)
    rows = table(args.size, args.only)
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
