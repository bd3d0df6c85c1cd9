"""E3: long streams. Per-frame outputs equal the model run on the whole stream (shifted by the
reported delay); a sliding-window clip head stays exact after 10^4 frames (nothing accumulates)."""
import torch
from torch import nn

import cocompile


class SlidingMeanHead(nn.Module):
    """Unpadded temporal convs and a clip-level mean: exact under E2 at every step."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 8, 3)
        self.c2 = nn.Conv1d(8, 8, 3, dilation=2)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        y = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc(y.mean(2))


@torch.no_grad()
def test_sliding_mean_head_does_not_drift_over_10k_frames():
    torch.manual_seed(0)
    model, T = SlidingMeanHead().eval(), 16
    co = cocompile.compile(model, torch.randn(1, 4, T))
    stream = torch.randn(2, 4, 10_000) * 10 + 100      # large offset: float sums would drift
    state = co.initial_state(2)
    worst = 0.0
    for t, chunk in enumerate(stream.split(co.step_frames, dim=2), start=1):
        y, state = co.step(chunk, state)
        if t % 2500 == 0 or t == stream.shape[2]:
            ref = model(stream[:, :, t - T:t])
            worst = max(worst, float((y - ref).abs().max() / max(1.0, float(ref.abs().max()))))
    assert t == 10_000
    assert worst <= 1e-4, worst


class PaddedPerFrame(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(3, 6, 5, padding=2)
        self.c2 = nn.Conv1d(6, 6, 3, padding=2, dilation=2)
        self.pool = nn.MaxPool1d(3, 1, 1)

    def forward(self, x):
        return self.pool(torch.relu(self.c2(torch.relu(self.c1(x)))) + x.repeat(1, 2, 1))


@torch.no_grad()
def test_per_frame_outputs_of_a_long_stream_match_the_model_on_the_stream():
    torch.manual_seed(1)
    model, T, N = PaddedPerFrame().eval(), 8, 400
    co = cocompile.compile(model, torch.randn(1, 3, T))
    stream = torch.randn(2, 3, N)
    state, frames = co.initial_state(2), []
    for chunk in stream.split(co.step_frames, dim=2):
        y, state = co.step(chunk, state)
        frames.append(y)
    got = torch.cat(frames, 2)[:, :, co.delay:]          # valid frames: the first `delay` are warm-up
    ref = model(stream)[:, :, :got.shape[2]]             # offline on the whole stream
    assert got.shape[2] == N - co.delay
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4 * max(1.0, float(ref.abs().max())))


@torch.no_grad()
def test_larger_step_frames_give_the_same_outputs():
    """step_frames may be any multiple of the default: E1 and the per-step values agree."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv1d(3, 6, 3, stride=2, padding=1), nn.ReLU(),
                          nn.MaxPool1d(3, 1, 1), nn.Conv1d(6, 6, 5, padding=4, dilation=2)).eval()
    clip = torch.randn(2, 3, 24)
    base = cocompile.compile(model, clip[:1])
    for c in (2 * base.step_frames, 3 * base.step_frames):
        co = cocompile.compile(model, clip[:1], step_frames=c)
        assert co.step_frames == c
        torch.testing.assert_close(co.forward_steps(clip), model(clip), rtol=0, atol=1e-5)
        a = torch.cat([co.step(x, s)[0] for x, s in _steps(co, clip)], 2)
        b = torch.cat([base.step(x, s)[0] for x, s in _steps(base, clip)], 2)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def _steps(co, clip):
    """(chunk, state before it) for every step of `clip`."""
    state = co.initial_state(clip.shape[0])
    for x in clip.split(co.step_frames, dim=2):
        yield x, state
        _, state = co.step(x, state)
