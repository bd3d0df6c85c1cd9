"""The step compiled by Inductor: just in time in this process (`co.compiled()`), or ahead of time
into a shared library inside a .pt2 package (AOTInductor), which Python and C++ load.

Both compile the step as a plain ATen graph with `freezing` on: the weights become constants of
the generated code, folded into what they multiply, so a small step pays for its arithmetic and
little else. Weight prepacking (oneDNN's blocked layouts, one switch for linear and conv) is on
only for a step that convolves: a step of matrix products alone (TCN, Transformer, ST-GCN) has a
few rows per stream, where oneDNN's prepacked linear is slower than the plain GEMM at every row
count measured (1 row: 51 against 15 us for 384x128 on this project's development CPU, AMD EPYC,
AVX2), while the X3D-M step, mostly convolutions, is faster prepacked (57.7 against 63.8 ms).
The offline model is compiled with Inductor's defaults and freezing. Both compute `co.step`
(E4's bound).

    co.compiled()                  torch.compile of the traced step, one compile per batch size
    co.export("co.aoti.pt2")       torch._inductor.aoti_compile_and_package of the exported step
                                   (batch dynamic); the metadata rides in the package's metadata

The package's metadata holds the cocompile JSON under "cocompile" (as every artifact does) and,
for consumers without a JSON parser (examples/aoti_runner), "cocompile.inputs" and
"cocompile.states": one line per step argument, `name dtype d1 d2 ...`, -1 on the batch axis.

>>> fast = co.compiled()
>>> y, state = fast.step(x_chunk, co.initial_state(1))        # as co.step
>>> co.export("co_tcn.aoti.pt2")
>>> torch._inductor.aoti_load_package("co_tcn.aoti.pt2")(x_chunk, *co.initial_state(1))
"""
from __future__ import annotations

import json
import warnings
import zipfile

import torch
from torch.export import Dim
from torch.utils import _pytree as pytree

from . import metadata as md
from .errors import CompileError, first_line
from .passes.tidy_step import tidy_step
from .step import TracedStep

# weights as constants of the code, folded (Inductor applies it to inference graphs)
OPTIONS = {"freezing": True}
CLIP_OPTIONS = {"freezing": True}          # the offline model: Inductor's defaults
PREPACK = "cpp.weight_prepack"             # on where the step convolves (see step_options)
INPUTS_KEY, STATES_KEY = "cocompile.inputs", "cocompile.states"
PACKAGE_MARK = "data/aotinductor/"          # where a package keeps its compiled model


class ContiguousOutputs(torch.nn.Module):
    """`fn` with every output contiguous. Compiled code reads its inputs with the strides it was
    compiled for (AOTInductor does not check them; torch.compile recompiles for new ones), and a
    next state is often a view into a larger buffer (the window slid by one step): the state that
    is fed back must come out in the layout the step reads."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return tuple(t.contiguous() for t in self.fn(*args))


def inductor_options(mode: str = "default", clip: bool = False) -> dict:
    """The Inductor options of `mode` (torch.compile's modes) with the step's OPTIONS (the
    package's too), or with CLIP_OPTIONS for the offline model it is measured against."""
    return {**torch._inductor.list_mode_options(mode), **(CLIP_OPTIONS if clip else OPTIONS)}


def step_options(options: dict, graph: torch.fx.Graph) -> dict:
    """`options` with weight prepacking on where the step graph convolves, off where its
    products are matrix products alone (see the module docstring)."""
    convolves = any(n.op == "call_function" and "convolution" in str(n.target) for n in graph.nodes)
    return {**options, PREPACK: convolves}


# -- just in time ----------------------------------------------------------------------------------
class InductorStep:
    """`co.step` compiled by torch.compile: per signature of (inputs, state) (in practice per batch
    size) the step is traced to a plain ATen graph (TracedStep) and compiled with static shapes on
    its first call. Runs without autograd (freezing needs inference).

    >>> fast = InductorStep(co)
    >>> y, state = fast.step(x_chunk, state)
    """

    def __init__(self, co, mode: str = "default"):
        self.co, self.mode = co, mode
        self.options = inductor_options(mode)
        self.traced = TracedStep(co.program)
        self.graphs: dict = {}

    def step(self, x_chunk, state: tuple) -> tuple:
        """As `co.step`: (outputs in the model's structure, next state)."""
        # one compile per batch size, not one per layout (a chunk sliced from a clip)
        args = tuple(dense(t) for t in (*self.co._leaves(x_chunk, exact=True), *state))
        key = tuple((t.shape, t.dtype, t.device) for t in args)
        with torch.no_grad():
            if key not in self.graphs:
                self.graphs[key] = self._compile(args)
            flat = self.graphs[key](*args)
        n = len(self.co.out_infos)
        return pytree.tree_unflatten(list(flat[:n]), self.co.out_spec), tuple(flat[n:])

    def initial_state(self, batch_size: int = 1, device=None, dtype=None) -> tuple:
        return self.co.initial_state(batch_size, device, dtype)

    def _compile(self, args):
        graph = self.traced._trace(args)        # checks the state, as the eager step does
        if isinstance(graph, torch.fx.GraphModule):
            contiguous_outputs(graph)
        else:                                   # not traceable: the interpreter, wrapped
            graph = ContiguousOutputs(graph)
        options = step_options(self.options, graph.graph) if isinstance(graph, torch.fx.GraphModule) \
            else self.options
        # the graph's own code: dynamo keys its cache by code object, so graphs never share one
        return torch.compile(graph, dynamic=False, fullgraph=True, options=options)


def contiguous_outputs(gm: torch.fx.GraphModule) -> None:
    """Makes every tensor output of `gm` contiguous, in the graph (see ContiguousOutputs)."""
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    with gm.graph.inserting_before(out):
        out.args = (pytree.tree_map_only(torch.fx.Node, lambda n: gm.graph.call_method(
            "contiguous", (n,)), out.args[0]),)
    gm.recompile()


def dense(t: torch.Tensor) -> torch.Tensor:
    """`t` contiguous, with the strides of a fresh tensor on its axes of size 1 too (which
    `contiguous()` leaves as they are, and dynamo's guards compare)."""
    t, strides, n = t.contiguous(), [], 1
    for size in reversed(t.shape):          # row-major: each axis steps over the axes after it
        strides.insert(0, n)
        n *= max(size, 1)
    return t if t.stride() == tuple(strides) else t.as_strided(t.shape, strides)


def compiled_step(co, mode: str = "default") -> InductorStep:
    """`co.compiled(mode)`: one InductorStep per mode, kept on `co`, so that asking again reuses
    what was compiled."""
    cache = co.__dict__.setdefault("_inductor", {})
    if mode not in cache:
        cache[mode] = InductorStep(co, mode)
    return cache[mode]


def compiled_clip(model: torch.nn.Module, mode: str = "default"):
    """The offline model compiled by torch.compile in `mode`, static shapes, Inductor's defaults
    and freezing: the clip that `co.compiled(mode)` is measured against."""
    return torch.compile(model, dynamic=False, options=inductor_options(mode, clip=True))


# -- ahead of time ---------------------------------------------------------------------------------
def write_aoti(co, path: str) -> None:
    """The exported step (batch dynamic, see export.export_program) compiled into a .pt2 package
    with AOTInductor; the metadata in the package's metadata."""
    from .export import export_program

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = contiguous_program(co, export_program(co))
            configs = {**step_options(OPTIONS, program.graph), "aot_inductor.metadata": package_metadata(co)}
            torch._inductor.aoti_compile_and_package(program, package_path=path,
                                                     inductor_configs=configs)
        except Exception as err:  # noqa: BLE001 - Inductor and the C++ compiler fail in many ways
            raise CompileError(f"AOTInductor could not compile the step: {first_line(err)}",
                               hint="export .pt2 (torch.export) or .onnx instead") from None


def contiguous_program(co, ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """The exported step again, tidied as the traced step is (passes/tidy_step.py: Inductor and
    onnxruntime fold constants and merge repeats themselves, but neither merges the products of
    one input), its outputs contiguous (see ContiguousOutputs; in ONNX every value is), the batch
    axis dynamic as in `ep` (unless the model pinned it). The package and the ONNX step are
    written from it."""
    from .export import arg_batch_dims

    args, _ = ep.example_inputs
    batch = Dim("batch")
    dynamic = None if md.compiled_batch(co) else (tuple({b: batch} for b in arg_batch_dims(co)),)
    module = ep.module()
    tidy_step(module)
    return torch.export.export(ContiguousOutputs(module), args, dynamic_shapes=dynamic)


def package_metadata(co) -> dict[str, str]:
    """The package's metadata entries: the cocompile JSON, and the step's arguments as lines."""
    meta = md.metadata(co)
    return {md.KEY: json.dumps(meta, indent=1),
            INPUTS_KEY: spec_lines(meta["inputs"]), STATES_KEY: spec_lines(meta["states"])}


def spec_lines(entries: list[dict]) -> str:
    """`name dtype d1 d2 ...` per entry, -1 on the batch axis (wherever it is: time-major inputs
    keep theirs), which the runner replaces with its number of streams.

    >>> spec_lines([{"name": "x", "dtype": "float32", "shape": [None, 8, 1], "batch_axis": 0}])
    'x float32 -1 8 1'
    """
    def dims(e):
        return [-1 if i == e.get("batch_axis", 0) else d for i, d in enumerate(e["shape"])]
    return "\n".join(" ".join([e["name"], e["dtype"], *map(str, dims(e))]) for e in entries)


def is_package(path: str) -> bool:
    """Whether `path` is an AOTInductor package (by content: a zip holding a compiled model)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(PACKAGE_MARK in name for name in archive.namelist())


def load_package(path: str):
    """(metadata, run) of a package: run(*inputs, *state) -> (*outputs, *next_state), on the CPU."""
    model = torch._inductor.aoti_load_package(path)
    text = model.get_metadata().get(md.KEY)
    if not text:
        raise ValueError(f"{path} has no cocompile metadata: not written by cocompile")
    # the package reads every input as contiguous (see ContiguousOutputs): a chunk sliced from
    # a clip is not, so it is copied first
    run = runner(model)
    return json.loads(text), lambda *args: tuple(run([t.contiguous() for t in args]))


def runner(model):
    """`run(list of tensors) -> list of tensors` of a loaded package: its loader's own call (what
    the C++ runner makes, AOTIModelPackageLoader::run), without the Python wrapper's per-call
    flattening and checking of the arguments' structure (about 60 us a call with a dozen state
    tensors on this project's development CPU: more than a small step's arithmetic)."""
    loader = getattr(model, "loader", None)
    if loader is None or not hasattr(loader, "run"):     # another torch: through the wrapper
        return lambda args: list(model(*args))
    return loader.run


def package_clip(model: torch.nn.Module, args: tuple, path: str) -> None:
    """The offline model compiled into a package with Inductor's defaults and freezing, the clip
    that the step's package is measured against (cocompile.bench)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(model, args)
        torch._inductor.aoti_compile_and_package(program, package_path=path, inductor_configs=CLIP_OPTIONS)

