"""compile(): the whole pipeline, one pass per line."""
from __future__ import annotations

import torch

from cocompile.passes.assign_states import assign_states
from cocompile.passes.choose_forms import choose_forms, rows_delays
from cocompile.passes.commute_graph_products import commute_graph_products
from cocompile.passes.demand import analyse_demand
from cocompile.passes.fold_batchnorm import fold_batchnorm
from cocompile.passes.fold_constants import fold_constants
from cocompile.passes.fold_positions import fold_positions
from cocompile.passes.fuse_attention import fuse_attention
from cocompile.passes.fuse_cell_loops import fuse_cell_loops
from cocompile.passes.hoist_affine_tail import hoist_affine_tails
from cocompile.passes.insert_delays import insert_delays
from cocompile.passes.insert_windows import insert_windows
from cocompile.passes.shape_probe import ShapeProbe
from cocompile.passes.split_projections import split_projections
from cocompile.passes.sum_parallel_products import sum_parallel_products
from cocompile.passes.time_axis import TimeAnalysis, default_step_frames

from . import ops  # noqa: F401  (registers the op rules)
from .capture import capture
from .errors import CompileError
from .inputs import Inputs
from .model import ContinualModel
from .step import StepProgram, TracedStep
from .timeinfo import META
from .verify import check_clip


def compile(model: torch.nn.Module, example_input, time_dim=2, batch_dim=0,
            step_frames: int | None = None, approximate: bool = False,
            trace: bool = True, verify: bool = True) -> ContinualModel:
    """Compile an offline clip model into a continual model that reads frames as they arrive.

    `example_input` is the clip (a tensor), a tuple of positional inputs, or any pytree of tensors
    the model takes (`[slow, fast]`); `time_dim` is one axis for all, or the same structure with
    None for side inputs that carry no time (see cocompile.inputs). `batch_dim` is each input's
    batch axis the same way (default 0): time-major (T, N, F) frames take time_dim=0, batch_dim=1,
    and the continual model's chunks, outputs and artifacts keep that layout.
    With trace=True the first step of each batch size traces the step into a plain ATen graph
    (about as long as one interpreted step of a large model) that later steps run; trace=False
    keeps running the graph interpreter (slower per step). Artifacts trace on export either way.
    With verify=True (the default) the continual model is checked against the model on the
    example clip (E1) before it is returned: a CompileError with the measured error if it
    differs; an approximate model keeps its measured deviation in `co.deviation`.

    >>> co = cocompile.compile(model, torch.randn(1, 3, 16, 64, 64), time_dim=2)
    >>> torch.testing.assert_close(co.forward_steps(clip), model(clip))
    """
    inputs = Inputs.describe(model, example_input, time_dim, batch_dim)
    try:
        co = _compile(model, example_input, inputs, step_frames, approximate, trace, False)
    except CompileError as err:
        if not err.no_rule:
            raise
        first = err
        # an op without a rule: its core-ATen decomposition may consist of ops that have rules
        try:
            co = _compile(model, example_input, inputs, step_frames, approximate, trace, True)
        except CompileError as err:
            raise (first if err.no_rule else err) from None    # name the op as the user wrote it
    if verify:
        offline = model.module() if isinstance(model, torch.export.ExportedProgram) else model
        check_clip(offline, co, example_input)
    return co


def _prepare(model, example_input, inputs: Inputs, decompose: bool):
    """The captured graph with the rewrites that do not need the time analysis."""
    # capture: torch.export at the example clip length, eval mode, batch kept dynamic
    cap = capture(model, example_input, inputs, decompose)
    # rewrite: attention written as matmul-softmax-matmul becomes one attention op
    fuse_attention(cap.gm)
    # rewrite: packed q/k/v projections split, so a query can be projected alone
    split_projections(cap.gm)
    # rewrite: position encodings folded through the Linears after them (cached projections stay)
    fold_positions(cap.gm, cap.input_names)
    # rewrite: values computed from constants only (weight slices, projected tables) computed once
    fold_constants(cap.gm, cap.consts, cap.input_names)
    # rewrite: summed parallel products (2s-AGCN's per-subset graph convs) become one product
    sum_parallel_products(cap.gm, cap.consts)
    # rewrite: a 1x1 conv and a product over joints in the order with fewer multiply-adds
    commute_graph_products(cap.gm, cap.consts)
    # rewrite: eval BatchNorm folded into the conv or graph product before it (one op less per step)
    fold_batchnorm(cap.gm, cap.consts)
    # rewrite: GRUCell/LSTMCell/RNNCell loops unrolled by export become one recurrent layer op
    fuse_cell_loops(cap.gm, cap.input_names)
    return cap


def _analyser(model, example_input, inputs: Inputs, approximate, decompose, cap):
    """TimeAnalysis of the captured graph, made with a shape probe (a second capture at twice the
    clip length) when the example clip leaves some value's time axis in doubt."""
    T = inputs.clip_length
    by_name = dict(zip(cap.input_names, (s.batch_first() for s in inputs.specs)))  # the graph's layout

    def analysis(probe=None):
        return TimeAnalysis(cap.gm, by_name, T, approximate, cap.consts, probe=probe)
    an = analysis()
    try:
        an.run()
    except CompileError:
        if not an.doubts:
            raise
    if not an.doubts:
        return analysis
    node, why = next(iter(an.doubts.items()))
    leaves = [torch.cat([t, t], s.time_dim) if s.is_time else t
              for t, s in zip(inputs.leaves(example_input), inputs.specs)]
    try:
        second = _prepare(model, inputs.unflatten(leaves), inputs, decompose)
    except CompileError as err:
        raise CompileError(f"{why} ({node.name}), so the example clip cannot show which axis holds "
                           f"time, and capturing the model at {2 * T} frames to find out failed: "
                           f"{err.reason}", hint="compile with a longer example clip, so that 2 or "
                           "more frames reach every op") from None
    probe = ShapeProbe.between(cap.gm, second.gm, (T, 2 * T))
    return lambda: analysis(probe)


def _compile(model, example_input, inputs, step_frames, approximate, trace, decompose):
    T = inputs.clip_length
    cap = _prepare(model, example_input, inputs, decompose)
    # analyse: time axis, rate, warm-up and receptive field of every value; which joins need
    # delays (where the example clip leaves an axis in doubt, a second capture settles it)
    analysis = _analyser(model, example_input, inputs, approximate, decompose, cap)
    analysis().run()
    # rewrite: affine ops after a mean over the clip (a classifier) run per frame before it, so
    # its window keeps their smaller result
    if hoist_affine_tails(cap.gm):
        analysis().run()
    # analyse: which values the outputs read only at the newest frames (e.g. y[:, -1])
    analyse_demand(cap.gm)
    # analyse again with the demand: single-output attention, windows cut to their newest frames
    an = analysis()
    requirements = an.run()
    # rewrite: windows where frames meet whole windows, newest frames where nothing older is read
    insert_windows(cap.gm, an.conversions)
    # rewrite: frame FIFOs line up joins and materialise explicit zero padding
    insert_delays(cap.gm, analysis().run() if an.conversions else requirements)
    # check: after the delays the analysis is a fixpoint (nothing left to align or convert)
    an = analysis()
    assert not an.run() and not an.conversions, "internal error: delays did not align every join"
    # step size: the smallest step whose every op emits whole frames, or a multiple the user chose
    c = _step_frames(cap.gm, step_frames, T)
    cap.gm.meta["cocompile.step_frames"] = c
    # step forms: per temporal conv the fastest of window / taps folded / partial sums (measured)
    # (in a step of channels-last products, the delays keep their frames channels-last too)
    rows_delays(cap.gm, choose_forms(cap.gm, cap.consts, c))
    # state: one named buffer per temporal window, delay and clip window, plus the frame counter
    specs = assign_states(cap.gm, an)
    # step program: the graph run per chunk by the step rules; traced per batch size on first use
    program = StepProgram(cap.gm, cap.consts, cap.input_names, specs, c, T,
                          [s.batch_dim for s in inputs.specs])
    step_fn = TracedStep(program) if trace else program
    out_infos = list(next(n for n in cap.gm.graph.nodes if n.op == "output").meta[META])
    return ContinualModel(program, step_fn, cap.out_spec, out_infos, inputs, example_input, approximate,
                          cap.out_batch_dims)


def _step_frames(gm, wanted: int | None, clip_length: int) -> int:
    base = default_step_frames(gm)
    c = base if wanted is None else wanted
    if c <= 0 or c % base:
        raise CompileError(f"step_frames={wanted} is not a multiple of {base}, the lcm of the "
                           "model's cumulative temporal strides, so some op would emit part of a frame",
                           hint=f"use step_frames={base} or a multiple of it")
    if clip_length % c:
        raise CompileError(f"the clip length {clip_length} is not a multiple of step_frames={c}",
                           hint=f"use a clip of {clip_length - clip_length % c or c} frames, or a "
                                "step_frames that divides the clip length")
    return c
