"""`co.export(path)`: one step of a ContinualModel as a deployable artifact (docs/design.md,
"Artifacts").

Every format holds the same function, `step(x, *state) -> (*outputs, *next_state)`, with the batch
axis dynamic on every input and output (states too; each input's at its batch_dim, each output's
where the model has it, states' at 0), and the JSON of `cocompile.metadata`:

    .onnx   torch.onnx.export(dynamo=True), renamed and cleaned with onnx-graphsurgeon; metadata in
            metadata_props["cocompile"]; passes onnx.checker full_check; runs in onnxruntime
    .pt     TorchScript (scripted from the exported ATen graph); metadata as extra file cocompile.json
    .pt2    torch.export.save of the step program; metadata as extra file cocompile.json
    .aoti.pt2  AOTInductor package of the step (cocompile.aoti), for Python and C++; metadata in
            the package's metadata

>>> co.export("co_model.onnx")
>>> check_artifact(co, "co_model.onnx").passed      # E4: same outputs and states as co.step
True
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import warnings
from dataclasses import dataclass

import torch
from torch.export import Dim
from torch.utils import _pytree as pytree

from cocompile.passes.tidy_step import tidy_step

from . import metadata as md
from .errors import CompileError, first_line
from .onnx_reshapes import tidy_reshapes
from .onnx_transposes import sink_transposes
from .ops.conv_forms import FORM_META, form_of, rows_step

E4_RTOL = 1e-5    # max|Δ| <= E4_RTOL * max(1, max|ref|) for every output and state
HALF_E4_ULPS = 16  # float16/bfloat16 artifacts: in ulps of their dtype (see e4_rtol)


class ExplicitStep(torch.nn.Module):
    """The step with every state an argument: forward(*inputs, *state) -> (*outputs, *next_state),
    one input per model input (the frames `x`, or `x.0`, `x.1`, `lengths`, ...)."""

    def __init__(self, program: torch.nn.Module):
        super().__init__()
        self.program = program

    def forward(self, *args):
        return tuple(self.program(*args))


def export(co, path: str | os.PathLike, quantize: str | None = None, calibration=None) -> str:
    """Write `co`'s step to `path`; the suffix picks the format (.onnx, .pt, .pt2). With
    quantize="int8", an ONNX step quantized on `calibration` clips (cocompile.quantize).

    >>> export(co, "co_model.pt2")
    'co_model.pt2'
    """
    path = os.fspath(path)
    if quantize is not None:
        from .quantize import write_quantized
        with torch.no_grad():
            return write_quantized(co, path, quantize, calibration)
    suffix = os.path.splitext(path)[1].lower()
    writer = WRITERS.get(suffix)
    if path.lower().endswith(".aoti.pt2"):            # AOTInductor package (cocompile.aoti)
        from .aoti import write_aoti as writer
    if writer is None:
        raise CompileError(f"cannot export to {path!r}: unknown suffix {suffix or '(none)'!r}",
                           hint="use one of " + ", ".join(WRITERS) + " (ONNX, TorchScript, torch.export)")
    with torch.no_grad():
        writer(co, path)
    return path


def example_args(co, batch: int = 2, seed: int | None = None) -> tuple[torch.Tensor, ...]:
    """(*inputs, *state) for one step: random frames (the example's side inputs) and the zero
    state, or a random state with seed."""
    g = None if seed is None else torch.Generator().manual_seed(seed)
    xs = co.example_inputs(batch, g)
    state = co.initial_state(batch)
    if g is not None:      # drawn on the CPU (the generator's device), then moved to the state's
        state = tuple(torch.randn(s.shape, generator=g).to(s) if s.is_floating_point() else s
                      for s in state)
    return (*xs, *state)


def export_program(co) -> torch.export.ExportedProgram:
    """torch.export the explicit step with the batch axis dynamic on every input (or fixed to the
    batch size the model pinned, see metadata.compiled_batch). Kept on `co` (one per portability),
    so writing several formats exports the step once."""
    cache = co.__dict__.setdefault("_exported", {})
    if co.program.portable not in cache:
        cache[co.program.portable] = _export_program(co)
    return cache[co.program.portable]


def _export_program(co) -> torch.export.ExportedProgram:
    fixed = md.compiled_batch(co)
    args = example_args(co, fixed or 2)
    batch = Dim("batch")
    dynamic = None if fixed else (tuple({b: batch} for b in arg_batch_dims(co)),)  # forward(*args)
    if fixed:
        warnings.warn(f"the model pins the batch size to {fixed}, so the artifact serves exactly "
                      f"{fixed} stream(s) per call", stacklevel=3)
    try:
        return torch.export.export(ExplicitStep(co.program), args, dynamic_shapes=dynamic)
    except Exception as err:  # noqa: BLE001 - report torch's first line
        raise CompileError(f"torch.export could not trace the step: {first_line(err)}") from None


def arg_batch_dims(co) -> list[int]:
    """The batch axis of each argument of the step: the inputs' batch_dim, then 0 per state."""
    return [s.batch_dim for s in co.inputs.specs] + [0] * len(co.specs)


def result_batch_dims(co) -> list[int | None]:
    """The batch axis of each result of the step: the outputs' (None: none), then 0 per state."""
    return list(co.out_batch_dims) + [0] * len(co.specs)


# -- .pt2 ------------------------------------------------------------------------------------------
def write_pt2(co, path: str) -> None:
    """torch.export archive of the step; the metadata rides along as cocompile.json."""
    torch.export.save(export_program(co), path, extra_files={md.EXTRA_FILE: md.dumps(co)})


# -- .onnx -----------------------------------------------------------------------------------------
def write_onnx(co, path: str) -> None:
    """ONNX via torch's dynamo exporter, then names, cleanup and metadata (see `finish_onnx`)."""
    import onnx

    from .aoti import contiguous_program

    co.program.portable = onnx_portable(co)
    try:
        ep = contiguous_program(co, export_program(co))
    finally:
        co.program.portable = False
    with _quiet():
        program = torch.onnx.export(ep, example_args(co), dynamo=True, verbose=False,
                                    external_data=False)
    model = finish_onnx(program.model_proto, co)
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as err:  # noqa: BLE001 - ValidationError, InferenceError
        typed = re.search(r"op_type:(\w+).*unsupported type: tensor\((\w+)\)", str(err))
        if typed:                      # e.g. ONNX defines no bfloat16 Conv
            raise CompileError(f"ONNX has no {typed[2]} {typed[1]} (the op's type constraints leave "
                               f"{typed[2]} out)", hint=DTYPE_HINT) from None
        raise CompileError(f"the exported ONNX model fails onnx.checker: {first_line(err)}") from None
    if co.dtype != torch.float32:
        _check_loads(model, co.dtype)
    onnx.save(model, path)


DTYPE_HINT = ("export a float32 or float16 ONNX step (compile the model and example in that dtype), "
              "or write .pt / .pt2, which run in every dtype")


def _check_loads(model, dtype: torch.dtype) -> None:
    """onnxruntime lacks kernels for some ops in some dtypes (bfloat16 Gemm, float64 Conv...), and
    its graph optimisations can crash on a graph in a dtype they were not tried on: load the model
    once, in a child process, so that such an artifact is refused here, naming the op or the
    crash, not when deployed."""
    import subprocess
    import sys
    import tempfile

    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "step.onnx")
        onnx.save(model, path)
        done = subprocess.run([sys.executable, "-c", _LOAD_CHILD, path], capture_output=True, text=True)
    if done.returncode == 0:
        return
    name = md.dtype_name(dtype)
    if done.returncode < 0:          # killed by a signal: onnxruntime itself crashed
        raise CompileError(f"onnxruntime crashed (signal {-done.returncode}) creating a session for "
                           f"the {name} step, so the ONNX artifact would not run", hint=DTYPE_HINT)
    err = done.stdout.strip() or done.stderr.strip()
    found = re.search(r"implementation for (\w+)\((\d+)\)", err)
    what = (f"has no {name} kernel for {found[1]} (opset {found[2]})" if found
            else f"cannot load the {name} step: {first_line(err)}")
    raise CompileError(f"onnxruntime {what}, so the ONNX artifact would not run", hint=DTYPE_HINT)


# the child that loads an artifact: its error on stdout and exit 3, or a crash the parent sees
_LOAD_CHILD = """
import sys
import onnxruntime as ort
try:
    ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
except Exception as err:
    print(err)
    sys.exit(3)
"""


def onnx_portable(co) -> bool:
    """Whether the ONNX step keeps stateless ops in the captured layout (StepInterpreter.portable).
    onnxruntime copies on every transpose, so channels-last products between NCHW convs cost
    copies there; but where every conv with a step form runs as a channels-last product and
    some keep their state as rows (ST-GCN: 1x1 graph convs and temporal convs), the eager forms
    keep the whole step channels-last (delays too, see passes/choose_forms.rows_delays), and the
    transposes between them sink through the elementwise ops and cancel (onnx_transposes), the
    reshape chains left collapsing (onnx_reshapes.tidy_reshapes)."""
    return not rows_step(form_of(n).name for n in co.program.gm.graph.nodes if FORM_META in n.meta)


def finish_onnx(model, co):
    """Readable names (x, states; y/y.i, next states), a symbolic batch axis, no dead nodes,
    every state documented, and the metadata under metadata_props["cocompile"]."""
    import onnx
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(model)
    batch = md.compiled_batch(co) or "batch"
    _name_all(graph.inputs, md.input_names(co), batch, arg_batch_dims(co))
    graph.outputs = _distinct_outputs(graph)
    _name_all(graph.outputs, md.all_output_names(co), batch, result_batch_dims(co))
    _widen_window_attrs(graph)
    graph.cleanup().toposort()
    graph = sink_transposes(graph)
    tidy_reshapes(graph, batch)
    out = gs.export_onnx(graph)
    out.producer_name, out.producer_version = "cocompile", md.cocompile_version()
    docs = {s.name: s.doc for s in co.specs} | {md.next_state_name(s.name): s.doc for s in co.specs}
    for value in [*out.graph.input, *out.graph.output]:
        value.doc_string = docs.get(value.name, "")
    onnx.helper.set_model_props(out, {md.KEY: md.dumps(co)})
    return out


def _name_all(tensors, names: list[str], batch, axes: list[int | None]) -> None:
    """Names the graph's inputs or outputs; `batch` on each one's batch axis (`axes`)."""
    if len(tensors) != len(names):
        raise CompileError(f"internal error: the ONNX graph has {len(tensors)} inputs/outputs, "
                           f"expected {len(names)} ({names[:3]}...)")
    for tensor, name, axis in zip(tensors, names, axes):
        tensor.name = name
        if tensor.shape and axis is not None:
            tensor.shape[axis] = batch


def _widen_window_attrs(graph) -> None:
    """ATen broadcasts a 1-element dilation/stride list over the kernel's axes; ONNX wants one
    entry per axis (torch.onnx copies the list as is, and full_check then rejects the model)."""
    for node in graph.nodes:
        rank = len(node.attrs.get("kernel_shape") or ())
        for key in ("dilations", "strides"):
            value = node.attrs.get(key)
            if rank > 1 and value is not None and len(value) == 1:
                node.attrs[key] = list(value) * rank


def _distinct_outputs(graph) -> list:
    """Graph outputs that can be renamed one by one: an output that is also a graph input, a
    constant or another output gets its own Identity (ONNX names a value exactly once)."""
    import onnx_graphsurgeon as gs

    seen, outs = {id(t) for t in graph.inputs}, []
    for t in graph.outputs:
        if id(t) in seen or isinstance(t, gs.Constant):
            t = graph.layer(op="Identity", inputs=[t], outputs=[gs.Variable(f"{t.name}_copy",
                            dtype=t.dtype, shape=t.shape)])[0]
        seen.add(id(t))
        outs.append(t)
    return outs


# -- .pt (TorchScript) -----------------------------------------------------------------------------
def write_torchscript(co, path: str) -> None:
    """TorchScript of the exported ATen step (scripted, so the batch stays dynamic); the metadata
    is the extra file cocompile.json."""
    gm = export_program(co).module()
    tidy_step(gm)
    gm = scriptable(gm)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message="The TorchScript type system")
        try:
            module = torch.jit.script(gm)
        except Exception as err:  # noqa: BLE001 - tracing keeps the sizes the graph reads
            warnings.warn(f"scripting the step failed ({first_line(err)}); tracing it instead",
                          stacklevel=3)
            module = torch.jit.trace(gm, example_args(co), check_trace=False)
        _check_batches(module, co)
        torch.jit.save(module, path, _extra_files={md.EXTRA_FILE: md.dumps(co)})


def scriptable(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A plain fx GraphModule TorchScript can compile: no pytree (un)flattening or export guards,
    batch sizes read with `x.size(d)`, ATen ops called by packet (TorchScript picks the overload)."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and not node.users and node.target.startswith("_guards"):
            graph.erase_node(node)
        elif node.target is torch.ops.aten.sym_size.int:
            node.op, node.target = "call_method", "size"
        elif isinstance(node.target, torch._ops.OpOverload):
            node.target = node.target.overloadpacket
    graph._codegen = torch.fx.graph.CodeGen()
    return torch.fx.GraphModule(gm, graph)


def _check_batches(module, co) -> None:
    """The TorchScript step must serve any batch size, not the one it was built with."""
    for batch in (md.compiled_batch(co),) if md.compiled_batch(co) else (1, 3):
        args = example_args(co, batch, seed=batch)
        want, got = co.program(*args), module(*args)
        if any(a.shape != b.shape or not torch.allclose(a, b, rtol=1e-4, atol=1e-5)
               for a, b in zip(want, got)):
            raise CompileError(f"the TorchScript step does not reproduce the step at batch {batch}",
                               hint="export to .onnx or .pt2 instead")


WRITERS = {".onnx": write_onnx, ".pt": write_torchscript, ".pt2": write_pt2}


# -- E4 --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class E4Report:
    """Largest error of an artifact against `co.step`, relative to max(1, max|ref|)."""

    path: str
    steps: int
    batch: int
    error: float
    worst: str          # name of the output or state with the largest error
    bound: float = E4_RTOL

    @property
    def passed(self) -> bool:
        return self.error <= self.bound

    def __str__(self) -> str:
        verdict = "ok" if self.passed else "FAIL"
        return (f"E4 {os.path.basename(self.path)}: {self.steps} steps x {self.batch} streams, "
                f"max rel err {self.error:.3g} (bound {self.bound:.3g}, worst {self.worst})  {verdict}")


def check_artifact(co, path: str, steps: int | None = None, batch: int = 2, seed: int = 0) -> E4Report:
    """E4: step the artifact (on its own state) and `co` side by side from the zero state, on
    `batch` independent random streams for `steps` steps (default 3·T); compare every output and
    next state."""
    from .loading import load_artifact

    run = load_artifact(path).run
    steps = 3 * co.clip_length if steps is None else steps
    batch = md.compiled_batch(co) or batch
    names, n = md.all_output_names(co), len(co.out_infos)
    g = torch.Generator().manual_seed(seed)
    ref_state, art_state = co.initial_state(batch), co.initial_state(batch, device="cpu")
    worst = (0.0, "-")
    for _ in range(steps):
        xs = co.example_inputs(batch, g)
        with torch.no_grad():
            outs, ref_state = co.step(co.inputs.unflatten(xs), ref_state)
        got = run(*[x.cpu() for x in xs], *art_state)      # artifacts load on the CPU
        art_state = tuple(torch.as_tensor(t) for t in got[n:])
        ref = (*pytree.tree_leaves(outs), *ref_state)
        worst = max([worst, *((_rel(a, b), name) for a, b, name in zip(got, ref, names))])
    return E4Report(path, steps, batch, worst[0], worst[1], e4_rtol(co.dtype))


def e4_rtol(dtype: torch.dtype) -> float:
    """E4's relative bound for a step in `dtype`: E4_RTOL (84 float32 ulps) for float32, as many
    ulps of float64 for float64; float16/bfloat16 artifacts HALF_E4_ULPS of theirs, measured in
    docs/precision.md."""
    if not dtype.is_floating_point or dtype == torch.float32:
        return E4_RTOL
    ulps = HALF_E4_ULPS if torch.finfo(dtype).bits < 32 else E4_RTOL / torch.finfo(torch.float32).eps
    return ulps * torch.finfo(dtype).eps


def _rel(got, ref: torch.Tensor) -> float:
    got = torch.as_tensor(got)
    if tuple(got.shape) != tuple(ref.shape):
        return float("inf")
    if not ref.numel():
        return 0.0
    ref = ref.detach().cpu().double()
    err = (got.double() - ref).abs().max().item()
    return err / max(1.0, ref.abs().max().item())


# -- helpers ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet():
    """Silence the exporter's progress lines and warnings about packages we do not use."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)

