"""Several inputs: time inputs at different frame rates joined by strided convs (SlowFast), side
inputs without time, and the errors that name what to fix. The untouched offline model is the
oracle throughout."""
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import cocompile
from cocompile.export import check_artifact
from cocompile.runtime import Session
from test_examples import run_example

EXAMPLES = int(os.environ.get("COCOMPILE_PROPERTY_EXAMPLES", "200")) // 8


# -- random architectures of several inputs --------------------------------------------------------
class MultiRate(nn.Module):
    """Time inputs at rates 1, 1/2 or 1/4 (fastest first), each through a same-length conv; the
    faster pathway is brought to the next one's rate by a strided conv and joined (concatenated
    and mixed by a 1x1 conv, or added); side inputs (embeddings) are projected and added to every
    frame of the slowest pathway. Outputs: its frames and their mean over the clip."""

    def __init__(self, spec):
        super().__init__()
        self.spec, ch = spec, spec["ch"]
        self.convs = nn.ModuleList(nn.Conv1d(ch, ch, k, padding=d * (k - 1) // 2, dilation=d)
                                   for k, d in spec["convs"])
        self.down, self.mix = nn.ModuleList(), nn.ModuleList()
        for (fast, slow), wide in zip(zip(spec["rates"], spec["rates"][1:]), spec["wide"]):
            s = fast // slow
            kernel, pad = (2 * s - 1, s - 1) if wide else (s, 0)
            self.down.append(nn.Conv1d(ch, ch, kernel, stride=s, padding=pad))
            self.mix.append(nn.Conv1d(2 * ch, ch, 1))
        self.sides = nn.ModuleList(nn.Linear(e, ch) for e in spec["sides"])

    def forward(self, *xs):
        n = len(self.spec["rates"])
        times, sides = xs[:n], xs[n:]
        h = torch.relu(self.convs[0](times[0]))
        for i in range(1, n):
            lateral, own = self.down[i - 1](h), torch.relu(self.convs[i](times[i]))
            h = self.mix[i - 1](torch.cat([own, lateral], 1)) if self.spec["cat"] else own + lateral
        for side, e in zip(self.sides, sides):
            h = h + side(e).unsqueeze(-1)
        return h, h.mean(2)


@st.composite
def multi_rate(draw):
    # frames per 4 frames of the fastest input, fastest first: 4 (rate 1), 2 (1/2), 1 (1/4)
    rates = draw(st.sampled_from([[4, 2], [4, 1], [2, 1], [4, 2, 1], [4, 4, 2]]))
    spec = {"rates": rates, "ch": draw(st.integers(1, 3)), "cat": draw(st.booleans()),
            "convs": [(draw(st.sampled_from([1, 3])), draw(st.sampled_from([1, 2]))) for _ in rates],
            "wide": [draw(st.booleans()) for _ in rates[1:]],
            "sides": draw(st.lists(st.integers(1, 3), max_size=2))}
    return spec, draw(st.sampled_from([8, 16])), draw(st.booleans())


def multi_rate_inputs(spec, clip, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    fastest = max(spec["rates"])
    times = [torch.randn(batch, spec["ch"], clip * r // fastest, generator=g) for r in spec["rates"]]
    sides = [torch.randn(batch, e, generator=g) for e in spec["sides"]]
    return times, sides


@settings(max_examples=EXAMPLES, deadline=None, derandomize=bool(os.environ.get("CI")),
          suppress_health_check=list(HealthCheck), print_blob=True)
@given(multi_rate())
def test_random_multi_rate_architectures_are_exact(arch):
    spec, clip, as_list = arch
    torch.manual_seed(0)
    model = MultiRate(spec).eval()
    times, sides = multi_rate_inputs(spec, clip, 2)
    if as_list:                                # one argument holding a list of every input
        wrapped = ListInput(model).eval()
        example, dims = [*times, *sides], [2] * len(times) + [None] * len(sides)
        co = cocompile.compile(wrapped, [t[:1] for t in example], time_dim=dims, trace=False, verify=False)
        report = cocompile.verify(wrapped, co, example)
    else:
        example, dims = (*times, *sides), (2,) * len(times) + (None,) * len(sides)
        co = cocompile.compile(model, tuple(t[:1] for t in example), time_dim=dims, trace=False, verify=False)
        report = cocompile.verify(model, co, example)
    assert co.step_frames % (max(spec["rates"]) // min(spec["rates"])) == 0
    assert report.passed, f"{spec}\n{report}"


class ListInput(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, xs):
        return self.inner(*xs)


# -- SlowFast ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def slowfast():
    return run_example("slowfast")["exact"]


def test_slowfast_streams_both_pathways_at_their_rates(slowfast):
    co = slowfast.co
    assert [(s.name, str(s.rate)) for s in co.inputs.specs] == [("x.0", "1/4"), ("x.1", "1")]
    assert co.step_frames == 4                    # one Slow frame and four Fast frames per step
    assert slowfast.report.passed and slowfast.report.max_error("E1") <= 1e-4 * max(1, slowfast.out_scale)
    assert slowfast.flops.ratio <= 1.1


TWO_RATES = {"rates": [4, 1], "ch": 2, "cat": True, "convs": [(3, 1), (3, 2)], "wide": [True],
             "sides": [3]}


@pytest.fixture(scope="module")
def two_rates():
    """A Fast and a Slow (1/4) pathway and a side embedding, compiled from a 16-frame clip."""
    torch.manual_seed(0)
    model = MultiRate(TWO_RATES).eval()
    times, sides = multi_rate_inputs(TWO_RATES, 16, 1)
    return model, cocompile.compile(model, (*times, *sides), time_dim=(2, 2, None))


@pytest.mark.parametrize("suffix", [".onnx", ".pt", ".pt2"])
def test_artifacts_take_one_input_per_model_input(two_rates, suffix, tmp_path):
    model, co = two_rates
    path = co.export(str(tmp_path / f"two_rates{suffix}"))
    report = check_artifact(co, path, steps=3 * co.clip_length // co.step_frames, batch=2)
    assert report.passed, str(report)
    meta = co.metadata()
    assert [(i["name"], i.get("rate"), i.get("frames_per_step"), i["time_axis"]) for i in meta["inputs"]] == \
        [("xs.0", "1", 4, 2), ("xs.1", "1/4", 1, 2), ("xs.2", None, None, None)]


def test_the_runtime_buffers_each_input_at_its_own_rate(two_rates, tmp_path):
    """Frames pushed one by one (a Slow frame with every 4th Fast frame, the side input once) give
    what co.step gives, for two streams with different side inputs."""
    model, co = two_rates
    streams = Session(co.export(str(tmp_path / "two_rates.onnx"))).streams(2)
    fast, side = torch.randn(2, 2, 3 * co.clip_length), torch.randn(2, 3)
    slow = fast[:, :, ::4].contiguous()
    streams.push([None, None, side.numpy()])
    state, compared = co.initial_state(2), 0
    for k in range(fast.shape[2] // 4):
        for j in range(4):
            out = streams.push([fast[:, :, 4 * k + j].numpy(), slow[:, :, k].numpy() if j == 0 else None, None])
        (frames, _), state = co.step((fast[:, :, 4 * k:4 * k + 4], slow[:, :, k:k + 1], side), state)
        for i in range(2):
            if out[i] is not None and out[i][0] is not None:
                np.testing.assert_allclose(out[i][0][:, -1], frames[i, :, -1].detach().numpy(), atol=1e-5)
                compared += 1
    assert compared > 0


# -- side inputs ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def conditioned():
    return run_example("conditioned_tcn")["exact"]


def test_side_input_example_meets_e1_and_its_step_costs_the_frames_plus_the_side_work(conditioned):
    from flops import count_flops
    r = conditioned
    assert r.report.passed and not r.report.approximate
    speaker = r.clip[1]
    side = sum(count_flops(f, speaker) for f in r.model.film)    # run per step: may change per step
    assert r.flops.step <= 1.1 * (r.flops.ideal + side)


def test_two_streams_with_different_side_inputs_step_like_two_separate_streams(conditioned):
    co, (frames, _) = conditioned.co, conditioned.clip
    torch.manual_seed(1)
    frames = torch.randn(2, *frames.shape[1:])
    speakers = torch.randn(2, conditioned.clip[1].shape[1])
    both = co.forward_steps((frames, speakers))
    alone = [co.forward_steps((frames[i:i + 1], speakers[i:i + 1])) for i in range(2)]
    torch.testing.assert_close(both, torch.cat(alone), rtol=0, atol=1e-5 * max(1, float(both.abs().max())))
    with torch.no_grad():
        torch.testing.assert_close(both, conditioned.model(frames, speakers), rtol=0, atol=1e-4)
    assert not torch.allclose(alone[0], alone[1])


def test_side_inputs_ride_along_in_the_runtime(conditioned, tmp_path):
    co = conditioned.co
    path = co.export(str(tmp_path / "cond.onnx"))
    sess = Session(path)
    assert [(i.name, i.time_axis) for i in sess.inputs] == [("frames", 2), ("speaker", None)]
    torch.manual_seed(2)
    frames, speakers = torch.randn(2, 8, 6), torch.randn(2, conditioned.clip[1].shape[1])
    streams = sess.streams(2)
    streams.push([None, speakers.numpy()])          # set once per stream; kept
    state = co.initial_state(2)
    for t in range(6):
        out = streams.push([frames[:, :, t].numpy(), None])
        y, state = co.step((frames[:, :, t:t + 1], speakers), state)
        for i in range(2):
            np.testing.assert_allclose(out[i][:, 0], y[i, :, 0].detach().numpy(), atol=1e-5)


# -- what users get wrong -----------------------------------------------------------------------------
class Two(nn.Module):
    def forward(self, x):
        return x[0].mean(2) + x[1].mean(2)


@pytest.mark.parametrize("example, time_dim, message", [
    ([torch.randn(1, 2, 16), torch.randn(1, 2, 6)], 2, r"(?s)x.1 has 6 frames.*not an integer rate.*x.1"),
    ([torch.randn(1, 2, 16), torch.randn(1, 2, 4)], [2], r"does not match the structure"),
    ([torch.randn(1, 2, 16), torch.randn(1, 2, 4)], (2, 2), r"does not match the structure"),
    ([torch.randn(1, 2, 16), torch.randn(1, 2, 4)], [2, 0], r"not an axis of input x.1"),
    ([torch.randn(1, 2, 16), "lengths"], 2, r"must be a tensor, a tuple of tensors"),
    ([torch.randn(1, 2, 16), torch.randn(1, 2, 4)], [None, None], r"no input carries time"),
])
def test_inputs_that_do_not_fit_are_refused_with_the_fix(example, time_dim, message):
    with pytest.raises(cocompile.CompileError, match=message) as err:
        cocompile.compile(Two().eval(), example, time_dim=time_dim)
    assert "fix:" in str(err.value)


def test_steps_with_the_wrong_inputs_or_frames_are_refused_with_the_fix():
    co = cocompile.compile(Two().eval(), [torch.randn(1, 2, 16), torch.randn(1, 2, 4)], time_dim=2)
    state = co.initial_state(1)
    cases = [(torch.randn(1, 2, 4), "structure"),                               # one tensor
             ([torch.randn(1, 2, 4)], "structure"),                             # one input of two
             ([torch.randn(1, 2, 4), torch.randn(1, 2, 4)], "1 frame of input x.1"),  # Slow: 1 frame
             ([torch.randn(1, 3, 4), torch.randn(1, 2, 1)], "does not fit frames")]
    for chunk, message in cases:
        with pytest.raises(cocompile.CompileError, match=message) as err:
            co.step(chunk, state)
        assert "fix:" in str(err.value)
    with pytest.raises(cocompile.CompileError, match="different numbers of steps"):
        co([torch.randn(1, 2, 8), torch.randn(1, 2, 1)])                      # 2 Fast steps, 1 Slow


def test_the_triton_repository_carries_every_input(two_rates, tmp_path):
    from google.protobuf import text_format

    from cocompile.triton import write_repository
    from test_triton import model_config_pb2
    model, co = two_rates
    folder = write_repository(co.export(str(tmp_path / "two_rates.onnx")), str(tmp_path / "repo"))
    pb = model_config_pb2()
    cfg = text_format.Parse(open(os.path.join(folder, "config.pbtxt")).read(), pb.ModelConfig())
    assert [(i.name, list(i.dims)) for i in cfg.input] == [("xs.0", [2, 4]), ("xs.1", [2, 1]), ("xs.2", [3])]
