"""Transformer encoders over time: the offline model on the sliding window is the oracle (E2),
the offline model on the whole stream for banded causal masks (E3)."""
from __future__ import annotations

import importlib
import math
import os
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import cocompile
from cocompile.inspect import count_flops
from cocompile.ops.attention import MODE

torch.manual_seed(0)


class Encoder(nn.Module):
    """nn.TransformerEncoder over (N, T, d) tokens with a head on the newest token or the mean."""

    def __init__(self, d=64, layers=2, norm_first=False, head="newest", n=16, pos=None, heads=4):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.1, batch_first=True,
                                           norm_first=norm_first)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head, self.out = head, nn.Linear(d, 7)
        if pos == "sinusoidal":
            self.register_buffer("pos", sinusoid(n, d)[None])
        else:
            self.pos = nn.Parameter(torch.randn(1, n, d) * 0.1) if pos == "learned" else None

    def forward(self, x):
        if self.pos is not None:
            x = x + self.pos[:, :x.size(1)]
        y = self.enc(x)
        return self.out(y[:, -1] if self.head == "newest" else y.mean(1))


def sinusoid(n, d):
    pos = torch.arange(n)[:, None]
    div = torch.exp(torch.arange(0, d, 2) * (-math.log(10000.0) / d))
    pe = torch.zeros(n, d)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * div), torch.cos(pos * div)
    return pe


def forms(co) -> list[str]:
    return [n.meta[MODE].kind for n in co.program.gm.graph.nodes if MODE in n.meta]


def check_sliding(model, n, d, steps=None):
    """E1 on a clip and E2 over `steps` (default 2n) steps past it; returns the compiled model."""
    model.eval()
    co = cocompile.compile(model, torch.randn(1, n, d), time_dim=1, trace=False)
    report = cocompile.verify(model, co, torch.randn(2, n, d), sliding_steps=steps or 2 * n)
    assert report.passed, report
    assert {c.name for c in report.checks if c.claimed} == {"E1", "E2"}, report
    return co


# a covering set of the acceptance grid (layers x norm x head x d x n); examples/encoder_bench.py
# runs the whole grid
GRID = [(1, False, "newest", 256, 64), (2, True, "mean", 64, 16), (3, False, "mean", 256, 16),
        (6, True, "newest", 64, 16), (2, False, "newest", 64, 64)]


@pytest.mark.parametrize("layers,norm_first,head,d,n", GRID)
def test_encoder_equals_the_model_on_the_sliding_window(layers, norm_first, head, d, n):
    co = check_sliding(Encoder(d, layers, norm_first, head, n), n, d)
    # the newest-token head reads only the newest query of the last layer
    want = ["window"] * (layers - 1) + ["single-output" if head == "newest" else "window"]
    assert forms(co) == want


def test_flops_per_step_against_the_window():
    """dim_feedforward = 4d, n = 64, d = 256 (FLOPs are counted, not timed)."""
    ratios = {}
    for layers in (1, 2):
        model = Encoder(256, layers, False, "newest", 64).eval()
        co = cocompile.compile(model, torch.randn(1, 64, 256), time_dim=1, trace=False)
        step, clip = count_flops(co)
        ratios[layers] = sum(clip.values()) / sum(step.values())
    assert ratios[1] >= 30 and ratios[2] >= 2, ratios


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("pos", ["sinusoidal", "learned"])
def test_position_encoded_encoders_are_exact(norm_first, pos):
    co = check_sliding(Encoder(64, 2, norm_first, "newest", 16, pos), 16, 64)
    assert forms(co) == ["window", "single-output"]


def test_position_table_folds_through_post_norm_projections():
    """Post-norm: x + pe reaches the q/k/v Linears directly, so per-token projections stay
    cached and the one-layer step stays far below the window's FLOPs; pre-norm recomputes."""
    ratios = {}
    for norm_first in (False, True):
        model = Encoder(64, 1, norm_first, "newest", 32, "sinusoidal").eval()
        co = cocompile.compile(model, torch.randn(1, 32, 64), time_dim=1, trace=False)
        step, clip = count_flops(co)
        ratios[norm_first] = sum(clip.values()) / sum(step.values())
    assert ratios[False] > 3 * ratios[True], ratios


class CausalEncoder(nn.Module):
    """Per-token outputs of an encoder whose mask is built from the input length: a band of
    `band` positions (each token sees the previous band-1 and itself), or causal (band None)."""

    def __init__(self, d=32, layers=2, band=None, norm_first=False):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.0, batch_first=True,
                                           norm_first=norm_first)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.band, self.out = band, nn.Linear(d, 3)

    def forward(self, x):
        t = x.size(1)
        if self.band is None:
            mask = nn.Transformer.generate_square_subsequent_mask(t)
            return self.out(self.enc(x, mask=mask, is_causal=True))
        lag = torch.arange(t)[:, None] - torch.arange(t)[None, :]
        return self.out(self.enc(x, mask=~((lag >= 0) & (lag < self.band)), is_causal=False))


def stream(co, x):
    """Per-token outputs of stepping `x` one frame at a time from the zero state."""
    state, outs = co.initial_state(x.shape[0]), []
    with torch.no_grad():
        for t in range(x.shape[1]):
            y, state = co.step(x[:, t:t + 1], state)
            outs.append(y)
    return torch.cat(outs, 1)


@pytest.mark.parametrize("layers", [1, 2, 3, 4])
def test_banded_causal_encoder_streams_exactly(layers):
    """E3: the offline model on the whole 4n-token stream, frame by frame."""
    n, d = 8, 32
    model = CausalEncoder(d, layers, band=n, norm_first=layers % 2 == 0).eval()
    co = cocompile.compile(model, torch.randn(1, 2 * n, d), time_dim=1, trace=False)
    assert forms(co) == ["causal"] * layers and co.delay == 0
    x = torch.randn(2, 4 * n, d)
    with torch.no_grad():
        ref = model(x)
    torch.testing.assert_close(stream(co, x), ref, atol=1e-4, rtol=1e-4)
    assert co.metadata()["outputs"][0]["exactness"] == "exact"


def test_steps_of_several_tokens():
    """Multi-token single-output (the newest 4 queries) and a causal band fed 4 tokens a step."""
    model = Encoder(32, 2, False, "newest", 16).eval()
    co = cocompile.compile(model, torch.randn(1, 16, 32), time_dim=1, step_frames=4, trace=False)
    assert cocompile.verify(model, co, torch.randn(2, 16, 32), sliding_steps=8).passed
    model = CausalEncoder(32, 2, band=5).eval()
    co = cocompile.compile(model, torch.randn(1, 16, 32), time_dim=1, step_frames=4, trace=False)
    x, state, outs = torch.randn(2, 48, 32), co.initial_state(2), []
    with torch.no_grad():
        for t in range(0, 48, 4):
            y, state = co.step(x[:, t:t + 4], state)
            outs.append(y)
        torch.testing.assert_close(torch.cat(outs, 1), model(x), atol=1e-4, rtol=1e-4)


def test_causal_mask_is_exact_for_the_clip_and_bounded_after():
    n, d = 16, 32
    model = CausalEncoder(d, 2).eval()
    co = cocompile.compile(model, torch.randn(1, n, d), time_dim=1, trace=False)
    x = torch.randn(2, 3 * n, d)
    with torch.no_grad():
        ref = model(x)
    got = stream(co, x)
    torch.testing.assert_close(got[:, :n], ref[:, :n], atol=1e-4, rtol=1e-4)
    meta = co.metadata()["outputs"][0]
    assert meta["exactness"] == "bounded" and meta["horizon"] == n
    report = cocompile.verify(model, co, torch.randn(2, n, d))
    assert report.passed and f"keeps the last {n} frames" in str(report)
    # after the clip, each token sees the last n tokens only: not the model on the whole stream
    assert (got[:, n:] - ref[:, n:]).abs().max() > 1e-3


class HandWritten(nn.Module):
    """Attention as users write it: matmul, scale, softmax, matmul; and MultiheadAttention with
    its weights requested (need_weights=True, the default), which torch computes with bmm."""

    def __init__(self, d=32, mha=False, read_weights=False):
        super().__init__()
        self.qkv, self.o, self.heads = nn.Linear(d, 3 * d), nn.Linear(d, d), 4
        self.mha = nn.MultiheadAttention(d, 4, batch_first=True) if mha else None
        self.read_weights = read_weights

    def forward(self, x):
        if self.mha is not None:
            y, w = self.mha(x, x, x)
            return y[:, -1] + (w.sum() if self.read_weights else 0)
        n, t, d = x.shape
        q, k, v = (z.view(n, t, self.heads, -1).transpose(1, 2) for z in self.qkv(x).chunk(3, -1))
        a = ((q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))).softmax(-1)
        return self.o((a @ v).transpose(1, 2).reshape(n, t, d))[:, -1]


@pytest.mark.parametrize("mha", [False, True])
def test_written_out_attention_is_recognised(mha):
    co = check_sliding(HandWritten(mha=mha), 12, 32)
    assert forms(co) == ["single-output"]


def test_attention_weights_read_elsewhere_are_refused_with_the_fix():
    with pytest.raises(cocompile.CompileError, match="need_weights=False"):
        cocompile.compile(HandWritten(mha=True, read_weights=True).eval(), torch.randn(1, 12, 32),
                          time_dim=1)


class ClassToken(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        layer = nn.TransformerEncoderLayer(d, 4, 2 * d, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)

    def forward(self, x):
        return self.enc(torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1))[:, 0]


def test_class_token_prepended_along_time_is_refused_with_the_fix():
    with pytest.raises(cocompile.CompileError, match="class token"):
        cocompile.compile(ClassToken().eval(), torch.randn(1, 8, 32), time_dim=1)


class PaddingMask(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.att = nn.MultiheadAttention(d, 4, batch_first=True)

    def forward(self, x):
        y, _ = self.att(x, x, x, key_padding_mask=x[..., 0] > 1.0, need_weights=False)
        return y[:, -1]


def test_input_dependent_masks_are_refused():
    with pytest.raises(cocompile.CompileError, match="mask depends on the input"):
        cocompile.compile(PaddingMask().eval(), torch.randn(1, 12, 32), time_dim=1)


class SpaceTime(nn.Module):
    """ViViT-style joint space-time attention over T*h*w tokens (time merged with space)."""

    def __init__(self, d=32, head="mean", frames=8, hw=4):
        super().__init__()
        self.embed = nn.Conv3d(3, d, (1, 4, 4), (1, 4, 4))
        layer = nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.pos = nn.Parameter(torch.randn(1, frames * hw, d) * 0.1)
        self.head, self.hw, self.out = head, hw, nn.Linear(d, 5)

    def forward(self, x):
        y = self.enc(self.embed(x).flatten(2).transpose(1, 2) + self.pos)
        if self.head == "mean":
            return self.out(y.mean(1))
        return self.out(y.view(y.shape[0], -1, self.hw, y.shape[-1])[:, -1].mean(1))


@pytest.mark.parametrize("head", ["mean", "newest"])
def test_joint_space_time_attention_is_exact(head):
    model = SpaceTime(head=head).eval()
    co = cocompile.compile(model, torch.randn(1, 3, 8, 8, 8), trace=False)
    report = cocompile.verify(model, co, torch.randn(2, 3, 8, 8, 8), sliding_steps=16)
    assert report.passed and report.max_error("E2") <= 1e-4, report
    # the newest frame's h*w tokens are the queries of the last layer (multi-token single-output)
    assert forms(co) == ["window", "single-output" if head == "newest" else "window"]


@pytest.mark.parametrize("model,n", [(Encoder(32, 2, False, "newest", 12), 12),
                                     (CausalEncoder(32, 2, band=4), 12)])
def test_onnx_artifact_steps_like_eager(tmp_path, model, n):
    """E4: the ONNX step equals the eager step over 3n steps, two streams."""
    from cocompile.runtime import Session
    model.eval()
    co = cocompile.compile(model, torch.randn(1, n, 32), time_dim=1)
    session = Session(co.export(str(tmp_path / "enc.onnx")))
    state, ref_state = session.initial_state(2), co.initial_state(2)
    for _ in range(3 * n):
        x = torch.randn(2, 1, 32)
        got, state = session.step(x.numpy(), state)
        ref, ref_state = co.step(x, ref_state)
        np.testing.assert_allclose(got[0], ref.numpy(), rtol=1e-5, atol=1e-5)


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))


@pytest.mark.parametrize("name", ["oadtr", "audio_transformer"])
def test_transformer_examples_are_exact(name):
    """What `python examples/<name>.py --size small` computes."""
    r = importlib.import_module(name).main(["--size", "small"])["exact"]
    assert r.report.passed and not r.report.approximate, str(r.report)
    assert r.flops.step < r.flops.clip


def test_transformer_benchmark_script():
    """`python examples/encoder_bench.py --quick` (the full grid is the same code)."""
    out = importlib.import_module("encoder_bench").main(["--quick"])
    assert all(ok for *_, ok in out["grid"])
    assert out["ratios"][(1, "newest")] > 10 and out["ratios"][(2, "newest")] >= 2


class RandomEncoder(nn.Module):
    """A random attention stack: a conv front end (stride, padding), layers of MHA + FFN with
    pre- or post-norm, an optional position table or causal band, and one of three heads."""

    def __init__(self, cfg):
        super().__init__()
        d, n = cfg["d"], cfg["n"]
        self.cfg = cfg
        self.front = nn.Conv1d(cfg["cin"], d, cfg["k"], stride=cfg["stride"], padding=cfg["pad"])
        self.layers = nn.ModuleList(nn.TransformerEncoderLayer(
            d, cfg["heads"], 2 * d, dropout=0.0, batch_first=True, norm_first=cfg["pre"])
            for _ in range(cfg["depth"]))
        self.pos = nn.Parameter(torch.randn(1, n, d) * 0.3) if cfg["pos"] else None
        self.out = nn.Linear(d, 3)

    def forward(self, x):
        h = self.front(x).transpose(1, 2)                  # (N, n, d) tokens
        if self.pos is not None:
            h = h + self.pos
        mask = None
        if self.cfg["band"]:
            t = h.size(1)
            lag = torch.arange(t)[:, None] - torch.arange(t)[None, :]
            mask = (lag < 0) | (lag >= self.cfg["band"])
        for layer in self.layers:
            h = layer(h, src_mask=mask)
        head = self.cfg["head"]
        return self.out(h[:, -1] if head == "newest" else h.mean(1) if head == "mean" else h)


@st.composite
def encoders(draw):
    stride = draw(st.sampled_from([1, 1, 2]))
    k = draw(st.integers(1, 3))
    pad = draw(st.integers(0, k - 1))
    frames = draw(st.integers(3, 8)) * stride            # whole steps of the stride
    n = (frames + 2 * pad - k) // stride + 1             # tokens after the front end
    head = draw(st.sampled_from(["newest", "mean", "tokens"]))
    cfg = dict(cin=draw(st.integers(1, 4)), d=draw(st.sampled_from([8, 16])), n=n, k=k,
               stride=stride, pad=pad, heads=draw(st.sampled_from([1, 2, 4])),
               depth=draw(st.integers(1, 3)), pre=draw(st.booleans()), head=head,
               pos=draw(st.booleans()), band=draw(st.sampled_from([0, 0, 2, 3])))
    return cfg, frames


@settings(max_examples=int(os.environ.get("COCOMPILE_ENCODER_EXAMPLES", "8")), deadline=None,
          derandomize=bool(os.environ.get("CI")), suppress_health_check=list(HealthCheck),
          print_blob=True)
@given(encoders())
def test_random_attention_stacks_are_exact(arch):
    cfg, frames = arch
    torch.manual_seed(0)
    model = RandomEncoder(cfg).eval()
    clip = torch.randn(2, cfg["cin"], frames)
    try:
        co = cocompile.compile(model, clip[:1], time_dim=2, trace=False)
    except cocompile.CompileError as err:
        # one token: its time axis is as long as the other size-1 axes attention's views make
        # (heads=1); where a second capture cannot settle it, compile must ask for more frames
        assert cfg["n"] == 1 and "longer example clip" in str(err), err
        return
    report = cocompile.verify(model, co, clip, sliding_steps=2 * frames)
    assert report.passed, f"{cfg}\n{report}"
    assert all(c.claimed for c in report.checks if c.name == "E1")


def test_one_token_example_is_settled_by_a_second_capture():
    """A 3-frame example that a k=3 front conv turns into one token, one head: the single frame
    cannot be told from attention's other size-1 axes, so compile captures the model again at 6
    frames, where the axis that grows is time; it streams exactly, as it does from 6 frames."""
    cfg = dict(cin=1, d=8, n=1, k=3, stride=1, pad=0, heads=1, depth=1, pre=False, head="newest",
               pos=False, band=0)
    torch.manual_seed(0)
    model = RandomEncoder(cfg).eval()
    for frames in (3, 6):
        co = cocompile.compile(model, torch.randn(1, 1, frames), time_dim=2, trace=False)
        assert cocompile.verify(model, co, torch.randn(2, 1, frames), sliding_steps=12).passed


class BandedMultihead(nn.Module):
    """nn.MultiheadAttention with its weights requested (so torch computes bmm-softmax-bmm on
    (N*heads, T, d) tensors) and a boolean band mask; per-token outputs."""

    def __init__(self, d=32, band=4):
        super().__init__()
        self.att, self.band, self.out = nn.MultiheadAttention(d, 4, batch_first=True), band, nn.Linear(d, 3)

    def forward(self, x):
        t = x.size(1)
        lag = torch.arange(t)[:, None] - torch.arange(t)[None, :]
        y, _ = self.att(x, x, x, attn_mask=(lag < 0) | (lag >= self.band))
        return self.out(y)


def test_written_out_banded_attention_streams_exactly():
    model = BandedMultihead().eval()
    co = cocompile.compile(model, torch.randn(1, 12, 32), time_dim=1, trace=False)
    assert forms(co) == ["causal"]
    x = torch.randn(2, 40, 32)
    with torch.no_grad():
        torch.testing.assert_close(stream(co, x), model(x), atol=1e-4, rtol=1e-4)
