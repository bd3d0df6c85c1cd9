"""The traced step: `co.step` runs one plain ATen graph per batch size, traced on the first step of
that size. Oracle: the step interpreter (`co.program`) on the same chunks and states. compile()
itself runs torch.export once (the capture); the step is only exported when an artifact is written."""
import os
import re
import sys

import pytest
import torch
from torch import fx, nn
from torch.utils import _pytree as pytree
from torch.utils.flop_counter import FlopCounterMode

import cocompile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
import stgcn  # noqa: E402
import tcn  # noqa: E402
import x3d  # noqa: E402


class PaddedResidualWithHead(nn.Module):
    """Padded and strided convs, a join that needs a delay, a per-frame and a clip-level output."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv1d(3, 6, 3, padding=1)
        self.b = nn.Conv1d(6, 6, 5, padding=2)
        self.down = nn.Conv1d(6, 8, 2, stride=2)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.a(x))
        h = h + self.b(h)
        y = self.down(h)
        return y, self.fc(y.mean(2))


def _models():
    torch.manual_seed(0)
    return {
        "padded_residual": (PaddedResidualWithHead().eval(), torch.randn(1, 3, 8), 2, False),
        "x3d_se_approximate": (x3d.build("small", se=True), x3d.example_input("small"), 2, True),
        "tcn": (tcn.build("small"), tcn.example_input("small"), 2, False),
        "stgcn_strided": (stgcn.build("small", "strided"), stgcn.example_input("small"), 2, False),
    }


MODELS = _models()


def _chunk(co, batch, g, strided=False):
    """Random frames; strided: a view into a longer clip (as clip.split gives), not contiguous."""
    if not strided:
        return torch.randn(co._chunk_shape(batch, co.step_frames), generator=g).to(co.dtype)
    clip = torch.randn(co._chunk_shape(batch, 2 * co.step_frames), generator=g).to(co.dtype)
    return clip.narrow(co.time_dim, co.step_frames, co.step_frames)


def _random_state(co, batch, g):
    """Random float states; the frame counter at a whole number of steps past the warm-up."""
    steps = int(torch.randint(co.clip_length // co.step_frames, 4 * co.clip_length, (), generator=g))
    state = [s.normal_(generator=g) if s.is_floating_point() else s for s in co.initial_state(batch)]
    state[0] = torch.full_like(state[0], steps * co.step_frames)
    return tuple(state)


@pytest.mark.parametrize("name", MODELS)
@torch.no_grad()
def test_traced_steps_equal_the_interpreter(name):
    """Batches 1 and 3 stepped in turn (so the per-batch graphs alternate), from the zero state and
    from a random one, on contiguous chunks and on views into a longer clip: every output and next
    state equals the interpreter's."""
    model, clip, time_dim, approximate = MODELS[name]
    co = cocompile.compile(model, clip, time_dim=time_dim, approximate=approximate)
    g = torch.Generator().manual_seed(1)
    starts = [co.initial_state(1), co.initial_state(3), _random_state(co, 1, g), _random_state(co, 3, g)]
    streams = [[s, s] for s in starts]               # [traced state, interpreter state]
    for t in range(co.clip_length // co.step_frames + 2):
        for stream in streams:
            x = _chunk(co, stream[0][0].shape[0], g, strided=t % 2 == 1)
            outs, stream[0] = co.step(x, stream[0])
            ref = co.program(x, *stream[1])
            n = len(ref) - len(stream[1])
            got = (*pytree.tree_leaves(outs), *stream[0])
            assert len(got) == len(ref)
            for a, b in zip(got, ref):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
            stream[1] = tuple(ref[n:])
    graphs = co._step_fn.graphs
    assert len(graphs) == 2                          # one per batch size, each traced once
    assert all(isinstance(gm, fx.GraphModule) and gm is not co.program for gm in graphs.values())


class Counting:
    """Counts ExportedPrograms made (torch.export and run_decompositions each make one)."""

    def __init__(self, monkeypatch):
        self.count = 0
        init = torch.export.ExportedProgram.__init__

        def counted(program, *args, **kwargs):
            self.count += 1
            init(program, *args, **kwargs)
        monkeypatch.setattr(torch.export.ExportedProgram, "__init__", counted)


def test_compile_exports_once_and_the_step_only_for_artifacts(monkeypatch, tmp_path):
    model, clip, _, _ = MODELS["padded_residual"]
    exports = Counting(monkeypatch)
    co = cocompile.compile(model, clip)
    assert exports.count == 1                        # the capture
    with torch.no_grad():
        co.forward_steps(torch.randn(2, 3, 8))
    assert exports.count == 1                        # stepping traces without torch.export
    co.export(tmp_path / "co.pt2")
    assert exports.count == 2                        # the artifact exports the step, batch dynamic


class InplaceDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv1d(2, 4, 3, padding=1), nn.Conv1d(4, 4, 3)
        self.drop = nn.Dropout(0.5, inplace=True)

    def forward(self, x):
        return self.c2(self.drop(torch.relu(self.c1(x))))


def test_eval_dropout_is_dropped_at_capture_without_a_decomposed_retry(monkeypatch):
    torch.manual_seed(0)
    model, clip = InplaceDropout().eval(), torch.randn(1, 2, 8)
    exports = Counting(monkeypatch)
    co = cocompile.compile(model, clip)
    assert exports.count == 1
    assert not any("dropout" in str(n.target) for n in co.program.gm.graph.nodes)
    assert cocompile.verify(model, co, clip).passed


def test_a_state_that_does_not_fit_is_refused_with_its_name():
    model, clip, _, _ = MODELS["padded_residual"]
    co = cocompile.compile(model, clip)
    x = torch.randn(co._chunk_shape(1, co.step_frames))
    with pytest.raises(cocompile.CompileError, match=r"(?s)state\.frames .* for 1 stream.*initial_state\(1\)"):
        co.step(x, co.initial_state(2))
    state = list(co.initial_state(1))
    state[-1] = state[-1].double()
    with pytest.raises(cocompile.CompileError, match=f"{co.specs[-1].name} must be torch.float32"):
        co.step(x, tuple(state))
    with pytest.raises(cocompile.CompileError, match=f"expected {len(co.specs)} state tensors"):
        co.step(x, tuple(state[:-1]))


@torch.no_grad()
def test_a_flop_counter_around_the_first_step_counts_one_step():
    """Tracing runs the program on fake tensors; modes around co.step must not see it."""
    model, clip, _, _ = MODELS["padded_residual"]
    co = cocompile.compile(model, clip)
    x = torch.randn(co._chunk_shape(1, co.step_frames))
    counts = []
    for _ in range(2):                               # the first call traces, the second does not
        with FlopCounterMode(display=False) as counter:
            co.step(x, co.initial_state(1))
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] > 0


@torch.no_grad()
def test_a_step_that_cannot_be_traced_runs_the_interpreter(monkeypatch):
    model, clip, _, _ = MODELS["padded_residual"]
    co = cocompile.compile(model, clip, verify=False)     # compile's E1 check would trace the step

    def untraceable(*args, **kwargs):
        raise RuntimeError("data-dependent shape")
    monkeypatch.setattr(cocompile.step, "make_fx", untraceable)
    with pytest.warns(UserWarning, match="could not be traced"):
        y = co.forward_steps(clip)
    for a, b in zip(pytree.tree_leaves(y), pytree.tree_leaves(model(clip))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_bench_reports_compile_time_and_the_first_step(capsys):
    from cocompile.cli import main
    example = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "stgcn.py")
    assert main(["bench", f"{example}:small_strided", "--steps", "3", "--eager-only"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"compile \d+\.\d\d s +first step \d+\.\d\d s", out), out
    assert re.search(r"clip 32 frames, step 4 frames", out), out
    assert re.search(r"^eager +\d+\.\d+ +\d+\.\d+ +\d+\.\dx", out, re.M), out
