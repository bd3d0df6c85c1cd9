"""Affine ops after a mean over the clip run per frame before it (passes/hoist_affine_tail.py):
the window then keeps their smaller result, and the outputs still equal the offline model."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cocompile
from cocompile.export import check_artifact
from cocompile.ops.clip import mean_of_tail


class Head(nn.Module):
    """An unpadded strided temporal conv, then one of several heads over its frames."""

    def __init__(self, head: str):
        super().__init__()
        self.head = head
        self.conv = nn.Conv1d(3, 16, 3, stride=2, dilation=2)
        self.small = nn.Linear(16, 5)
        self.wide = nn.Linear(16, 64)
        self.point = nn.Conv1d(16, 4, 1)
        self.last = nn.Linear(5, 3)

    def forward(self, x):
        y = torch.relu(self.conv(x))                                   # (N, 16, T')
        if self.head == "mean-linear":
            return self.small(y.mean(2))
        if self.head == "adaptive-scale-shift":
            return self.small(F.adaptive_avg_pool1d(y, 1).flatten(1)) * 2.0 - 0.5
        if self.head == "pool-conv-view":
            return self.point(F.avg_pool1d(y, y.shape[2])).view(x.shape[0], -1)
        if self.head == "keepdim-permute-linear":
            return self.small(y.mean(2, keepdim=True).permute(0, 2, 1)).squeeze(1)
        if self.head == "linear-relu-linear":
            return self.last(torch.relu(self.small(y.mean(2))))
        if self.head == "times-clip-value":
            return self.small(y.mean(2)) * self.small(y.amax(2))
        if self.head == "wider":
            return self.wide(y.mean(2))
        if self.head == "max":
            return self.small(y.amax(2))
        raise ValueError(self.head)


# head: values per frame its window keeps (16 without the rewrite)
HEADS = {"mean-linear": 5, "adaptive-scale-shift": 5, "pool-conv-view": 4,
         "keepdim-permute-linear": 5, "linear-relu-linear": 5, "times-clip-value": 5,
         "wider": 16, "max": 16}


def tails(co) -> list:
    return [n for n in co.program.gm.graph.nodes if n.target is mean_of_tail]


def windows(co) -> list[tuple]:
    return [s.shape for s in co.specs if s.name.endswith(".clip")]


@pytest.mark.parametrize("head", list(HEADS))
def test_the_window_keeps_the_affine_result_and_the_outputs_stay_exact(head):
    torch.manual_seed(0)
    model = Head(head).eval()
    clip = torch.randn(2, 3, 24)
    co = cocompile.compile(model, clip[:1])
    frames = co.clip_length // 2 - 2                                   # the conv's output frames
    per_frame = HEADS[head]
    assert len(tails(co)) == (per_frame < 16), head
    expected = [(frames, per_frame)] if per_frame < 16 else [(16, frames)]
    if head == "times-clip-value":                                     # the amax keeps its own
        expected.append((16, frames))
    assert windows(co) == expected
    report = cocompile.verify(model, co, clip)
    assert report.passed and co.exact_sliding, report


def test_several_frames_per_step_each_run_through_the_ops():
    torch.manual_seed(1)
    model = Head("pool-conv-view").eval()
    clip = torch.randn(3, 3, 40)
    co = cocompile.compile(model, clip[:1], step_frames=8)            # 4 conv frames per step
    assert len(tails(co)) == 1
    assert cocompile.verify(model, co, clip).passed
    # a stream three clips long: every valid step equals the model on its last clip_length frames
    stream = torch.randn(3, 3, 3 * co.clip_length)
    state = co.initial_state(3)
    for k, chunk in enumerate(stream.split(co.step_frames, 2)):
        y, state = co.step(chunk, state)
        end = (k + 1) * co.step_frames
        if end >= co.clip_length:
            ref = model(stream[:, :, end - co.clip_length:end])
            torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-4)


def test_artifacts_step_the_moved_ops_like_the_eager_step(tmp_path):
    torch.manual_seed(2)
    model = Head("adaptive-scale-shift").eval()
    co = cocompile.compile(model, torch.randn(1, 3, 24))
    for suffix in (".onnx", ".pt"):
        path = str(tmp_path / f"co{suffix}")
        co.export(path)
        report = check_artifact(co, path)
        assert report.passed, (suffix, report)


class Persons(nn.Module):
    """ST-GCN's head: pool over (time, joints), mean over the persons folded into the batch,
    a 1x1 conv classifier, a view with the batch size."""

    def __init__(self, persons=2, classes=6):
        super().__init__()
        self.persons = persons
        self.conv = nn.Conv2d(3, 8, (3, 1))
        self.fcn = nn.Conv2d(8, classes, 1)

    def forward(self, x):                                              # (N, C, T, V, M)
        n, c, t, v, m = x.shape
        x = x.permute(0, 4, 1, 2, 3).reshape(n * m, c, t, v)
        y = torch.relu(self.conv(x))
        y = F.avg_pool2d(y, y.shape[2:]).view(n, m, -1, 1, 1).mean(1)
        return self.fcn(y).view(n, -1)


def test_a_head_over_persons_folded_into_the_batch():
    torch.manual_seed(3)
    model = Persons().eval()
    clip = torch.randn(2, 3, 12, 5, 2)
    co = cocompile.compile(model, clip[:1])
    assert len(tails(co)) == 1 and windows(co) == [(10, 6)]          # was (2, 8, 10, 1)
    report = cocompile.verify(model, co, clip)
    assert report.passed and co.exact_sliding, report


class SqueezeExcite(nn.Module):
    """Clip-level gating: the clip mean, squeezed by a 1x1 conv, gates every frame (approximate)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 16, 3)
        self.down, self.up = nn.Conv1d(16, 4, 1), nn.Conv1d(4, 16, 1)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        gate = torch.sigmoid(self.up(torch.relu(self.down(y.mean(2, keepdim=True)))))
        return y * gate


def test_a_gate_mid_network_streams_as_without_the_rewrite(monkeypatch):
    """approximate=True: a causal window for the gate's mean. Moving the squeeze before the mean
    changes what the window keeps (4 values per frame instead of 16), not what the stream computes."""
    torch.manual_seed(4)
    model = SqueezeExcite().eval()
    clip = torch.randn(2, 3, 20)
    moved = cocompile.compile(model, clip[:1], approximate=True)
    assert len(tails(moved)) == 1 and windows(moved) == [(18, 4, 1)]
    import cocompile.compiler as compiler
    monkeypatch.setattr(compiler, "hoist_affine_tails", lambda gm: 0)
    kept = cocompile.compile(model, clip[:1], approximate=True)
    assert not tails(kept) and windows(kept) == [(16, 18)]
    stream = torch.randn(2, 3, 3 * 20)
    a, b = moved.initial_state(2), kept.initial_state(2)
    for chunk in stream.split(moved.step_frames, 2):
        ya, a = moved.step(chunk, a)
        yb, b = kept.step(chunk, b)
        torch.testing.assert_close(ya, yb, atol=1e-5, rtol=1e-4)
