"""The passes one by one: analysis records, the delay rewrite's invariants, state naming."""
import sympy
import torch
import torch.nn.functional as F
from torch import nn

from cocompile import ops  # noqa: F401  (registers the rules)
from cocompile.capture import capture
from cocompile.passes.assign_states import assign_states
from cocompile.passes.insert_delays import insert_delays
from cocompile.passes.time_axis import TimeAnalysis, default_step_frames
from cocompile.timeinfo import META


class Branches(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv1d(2, 4, 3, stride=2, padding=1)
        self.body = nn.Conv1d(4, 4, 5, padding=2)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        y = self.stem(x)
        z = F.relu(self.body(y)) + y                 # body lags 2 frames behind the shortcut
        frames = z.permute(0, 2, 1)                  # (N, T, C)
        merged = frames.reshape(-1, 4)               # (N*T, C): time merged with the batch
        return self.head(merged).view(x.shape[0], -1, 3), z.mean(2)


def analysed(model=None, T=16):
    model = (model or Branches()).eval()
    cap = capture(model, torch.randn(1, 2, T), 2)
    an = TimeAnalysis(cap.gm, {cap.input_name: 2}, T)
    return model, cap, an, an.run()


def node(gm, name):
    return next(n for n in gm.graph.nodes if n.name == name)


def test_analysis_records_axis_rate_warmup_and_receptive_field():
    _, cap, _, req = analysed()
    convs = [n for n in cap.gm.graph.nodes if "conv" in str(n.target)]
    stem, body = (n.meta[META] for n in convs)
    assert (stem.dim, stem.rate, stem.length, stem.warmup, stem.rf) == (2, sympy.Rational(1, 2), 8, 0, 3)
    assert (body.rate, body.warmup, body.rf) == (sympy.Rational(1, 2), 2, 3 + 4 * 2)
    view = next(n for n in cap.gm.graph.nodes if str(n.target).startswith(("aten.view", "aten.reshape")))
    merged = view.meta[META]
    assert merged.dim == 0 and merged.inner == 1 and merged.outer.free_symbols   # batch * time
    assert len(req) == 1, "one delay: the residual shortcut"
    assert default_step_frames(cap.gm) == 2


def test_delays_keep_offline_meaning_and_reach_a_fixpoint():
    model, cap, an, req = analysed()
    insert_delays(cap.gm, req)
    cap.gm.graph.lint()
    # offline, a delay is the identity: the rewritten graph still computes the model
    x = torch.randn(3, 2, 16)
    args = [x if n.name == cap.input_name else cap.consts[n.name]
            for n in cap.gm.graph.nodes if n.op == "placeholder"]
    for got, ref in zip(cap.gm(*args), model(x)):
        torch.testing.assert_close(got, ref)
    # and the analysis asks for nothing more (running the pass again changes nothing)
    again = TimeAnalysis(cap.gm, {cap.input_name: 2}, 16)
    assert again.run() == {}
    assert insert_delays(cap.gm, {}) == 0


def test_states_are_named_after_modules():
    _, cap, _, req = analysed()
    insert_delays(cap.gm, req)
    an = TimeAnalysis(cap.gm, {cap.input_name: 2}, 16)
    an.run()
    names = [s.name for s in assign_states(cap.gm, an)]
    assert names[0] == "state.frames"
    assert "state.stem" in names and "state.body" in names
    assert any(n.endswith(".delay") for n in names)
    assert any(n.endswith(".clip") for n in names)
    assert len(set(names)) == len(names)
