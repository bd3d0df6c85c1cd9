"""cocompile.runtime (docs/design.md, "Runtime"): numpy + onnxruntime only, per-stream state, frame buffering,
outputs only when valid, batched streams, isolated resets, clear input errors."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
import torch
from torch.utils import _pytree as pytree

from cocompile.runtime import Session
from test_export import build

TOL = 1e-5


@pytest.fixture(scope="module", params=["tcn", "conv3d"])
def setup(request, tmp_path_factory):
    """(continual model, its ONNX session, artifact path) for one tiny model."""
    _, _, co = build(request.param)
    path = str(co.export(tmp_path_factory.mktemp(request.param) / "co_model.onnx"))
    return co, Session(path, threads=1), path


def frames_of(co, streams: int, n: int, seed: int = 0) -> np.ndarray:
    """(streams, n, *frame_shape) random float32 frames."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((streams, n, *co.frame_shape)).astype(np.float32)


def as_clip(co, frames: np.ndarray) -> torch.Tensor:
    """(streams, n, *frame_shape) -> model layout with time on co.time_dim."""
    return torch.from_numpy(np.moveaxis(frames, 1, co.time_dim).copy())


def close(a, b) -> bool:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return a.shape == b.shape and np.abs(a - b).max(initial=0) <= TOL * max(1.0, np.abs(b).max(initial=0))


def parts(value) -> list:
    """A pushed result as a list of outputs (an array for one-output models, else a tuple)."""
    return [value] if isinstance(value, np.ndarray) else list(value)


def same(a, b, exact: bool = False) -> bool:
    """Two pushed results agree: both None, or output by output (None where not valid)."""
    if a is None or b is None:
        return a is None and b is None
    return all((u is None and v is None) or (u is not None and v is not None and
               (np.array_equal(u, v) if exact else close(u, v))) for u, v in zip(parts(a), parts(b)))


def reference(co, frames: np.ndarray) -> list:
    """What the stateful ContinualModel returns, chunk by chunk, for each stream: per step, the
    flat outputs with None where not valid (per-frame outputs: their valid frames)."""
    co.reset()
    clip, c, out = as_clip(co, frames), co.step_frames, []
    for k in range(frames.shape[1] // c):
        y = co(clip.narrow(co.time_dim, k * c, c))
        out.append(pytree.tree_leaves(y, is_leaf=lambda v: v is None))
    co.reset()
    return out


def pushed(results: list, stream: int, n_out: int) -> list:
    """The runtime's per-step results of one stream, as flat lists (None where not valid)."""
    flat = []
    for r in results:
        if r[stream] is None:
            flat.append([None] * n_out)
        else:
            flat.append([r[stream]] if n_out == 1 else list(r[stream]))
    return flat


# -- explicit state ------------------------------------------------------------------------------
def test_session_reads_metadata(setup):
    co, sess, _ = setup
    assert sess.step_frames == co.step_frames and sess.time_axis == co.time_dim
    assert sess.frame_shape == co.frame_shape and sess.dtype == np.float32
    assert [s["name"] for s in sess.states] == [s.name for s in co.specs]
    assert all(not s.any() for s in sess.initial_state(3)) and len(sess.initial_state(3)[0]) == 3


def test_step_matches_continual_model(setup):
    co, sess, _ = setup
    state_np, state_t = sess.initial_state(2), co.initial_state(2)
    for x in as_clip(co, frames_of(co, 2, 2 * co.clip_length)).split(co.step_frames, co.time_dim):
        outs, state_np = sess.step(x.numpy(), state_np)
        ref, state_t = co.step(x, state_t)
        for a, b in zip([*outs, *state_np], [*pytree.tree_leaves(ref), *state_t]):
            assert close(a, b.numpy())


# -- frames, validity, batches -------------------------------------------------------------------
def test_single_stream_push_frames(setup):
    """Frame by frame: nothing until a whole step is buffered, then exactly the valid outputs."""
    co, sess, _ = setup
    frames = frames_of(co, 1, 3 * co.clip_length)
    stream, results = sess.stream(), []
    for t, frame in enumerate(frames[0]):
        y = stream.push(frame)
        if (t + 1) % co.step_frames:
            assert y is None
        else:
            results.append([y])
    assert stream.frames_seen == frames.shape[1]
    ref = reference(co, frames)
    n_out = len(co.out_infos)
    for step, (got, want) in enumerate(zip(pushed(results, 0, n_out), ref)):
        for g, w in zip(got, want):
            assert (g is None) == (w is None), step
            if w is not None:
                assert close(g, w[0].numpy()), step


def test_streams_batch_equals_separate_streams(setup):
    co, sess, _ = setup
    frames = frames_of(co, 3, 2 * co.clip_length, seed=5)
    pool = sess.streams(3)
    together = [pool.push(frames[:, t]) for t in range(frames.shape[1])]
    for i in range(3):
        alone = sess.stream()
        for t in range(frames.shape[1]):
            assert same(together[t][i], alone.push(frames[i, t])), (i, t)


def _run(sess, frames, reset_at=None, nan_at=None, stream=1):
    """Push frames through a pool; optionally reset `stream` before frame reset_at, or feed it NaN
    from frame nan_at on. Returns results and the final state."""
    pool = sess.streams(frames.shape[0])
    results = []
    for t in range(frames.shape[1]):
        if t == reset_at:
            pool.reset(stream)
        batch = frames[:, t].copy()
        if nan_at is not None and t >= nan_at:
            batch[stream] = np.nan
        results.append(pool.push(batch))
    return results, pool.state


@pytest.mark.parametrize("event", ["reset", "nan"])
def test_stream_isolation(setup, event):
    """Resetting stream 1 (at a step boundary) or feeding it NaN leaves streams 0 and 2
    bit-identical to the same batched run without it."""
    co, sess, _ = setup
    frames = frames_of(co, 3, 2 * co.clip_length, seed=7)
    at = co.clip_length
    base, base_state = _run(sess, frames)
    kwargs = {"reset_at": at} if event == "reset" else {"nan_at": at}
    hit, hit_state = _run(sess, frames, **kwargs)
    for t in range(frames.shape[1]):
        for i in (0, 2):
            assert same(base[t][i], hit[t][i], exact=True), (t, i)
    for a, b in zip(base_state, hit_state):
        assert np.array_equal(a[[0, 2]], b[[0, 2]])
    assert any(not same(base[t][1], hit[t][1], exact=True) for t in range(at, frames.shape[1]))
    if event == "nan":
        assert any(np.isnan(s[1]).any() for s in hit_state if s.dtype.kind == "f")


def test_reset_restarts_warmup_mid_step(setup):
    """A reset between step boundaries: the stream starts over (warm-up again) and then matches a
    fresh stream fed the same frames; the others keep going."""
    co, sess, _ = setup
    frames = frames_of(co, 2, 3 * co.clip_length, seed=3)
    pool, fresh = sess.streams(2), sess.stream()
    at = co.clip_length + 1
    for t in range(frames.shape[1]):
        if t == at:
            pool.reset(1)
        out = pool.push(frames[:, t])[1]
        if t >= at:
            assert same(out, fresh.push(frames[1, t])), t
    assert pool.frames_seen[1] + co.step_frames > frames.shape[1] - at >= pool.frames_seen[1]


def test_push_subset_of_streams(setup):
    """Streams whose frames arrive at different times: push to a subset."""
    co, sess, _ = setup
    frames = frames_of(co, 2, co.clip_length, seed=9)
    pool = sess.streams(2)
    for t in range(frames.shape[1]):
        pool.push(frames[0:1, t], streams=[0])
    assert pool.frames_seen.tolist() == [frames.shape[1], 0]


# -- errors --------------------------------------------------------------------------------------
def test_wrong_shape_and_dtype(setup):
    co, sess, _ = setup
    frame = np.zeros(co.frame_shape, np.float32)
    stream, pool = sess.stream(), sess.streams(2)
    with pytest.raises(ValueError, match=r"expected shape \(%s" % co.frame_shape[0]):
        stream.push(np.zeros((*co.frame_shape, 1), np.float32))
    with pytest.raises(ValueError, match="float32"):
        stream.push(frame.astype(np.float64))
    with pytest.raises(ValueError, match=r"expected shape \(2, "):
        pool.push(frame[None])
    with pytest.raises(ValueError, match="distinct"):
        pool.push(np.stack([frame, frame]), streams=[1, 1])
    with pytest.raises(ValueError, match=r"expected \(batch, "):
        sess.step(np.zeros((1, 1), np.float32), sess.initial_state(1))
    chunk = np.zeros((1, *sess.chunk_shape), np.float32)
    with pytest.raises(ValueError, match="state has"):
        sess.step(chunk, sess.initial_state(1)[:-1])
    with pytest.raises(ValueError, match="state.frames"):
        sess.step(chunk, (np.zeros(2, np.int64),) + sess.initial_state(1)[1:])


def test_foreign_onnx_is_refused(tmp_path):
    node = onnx.helper.make_node("Identity", ["a"], ["b"])
    value = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph([node], "g", [value("a", onnx.TensorProto.FLOAT, [1])],
                                   [value("b", onnx.TensorProto.FLOAT, [1])])
    onnx.save(onnx.helper.make_model(graph), tmp_path / "plain.onnx")
    with pytest.raises(ValueError, match="not an artifact written by cocompile"):
        Session(str(tmp_path / "plain.onnx"))


# -- without torch -------------------------------------------------------------------------------
def test_runtime_without_torch(setup, tmp_path):
    """In a process where `import torch` fails, cocompile.runtime steps the artifact to the
    outputs of the eager continual model."""
    co, _, path = setup
    x = as_clip(co, frames_of(co, 2, 2 * co.clip_length, seed=11))
    state, ref = co.initial_state(2), []
    for chunk in x.split(co.step_frames, co.time_dim):
        outs, state = co.step(chunk, state)
        ref += [t.numpy() for t in pytree.tree_leaves(outs)] + [t.numpy() for t in state]
    np.savez(tmp_path / "io.npz", x=x.numpy(), *ref)
    fake = tmp_path / "fake" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('torch is not available here')\n")
    script = textwrap.dedent(f"""
        import sys
        import numpy as np
        import cocompile.runtime as rt
        try:
            import torch
            sys.exit("torch imported")
        except ImportError:
            pass
        sess = rt.Session({path!r})
        io = np.load({str(tmp_path / "io.npz")!r})
        ref = [io[f"arr_{{i}}"] for i in range(len(io.files) - 1)]
        state, got = sess.initial_state(2), []
        for chunk in np.split(io["x"], io["x"].shape[{co.time_dim}] // sess.step_frames, axis={co.time_dim}):
            outs, state = sess.step(np.ascontiguousarray(chunk), state)
            got += list(outs) + list(state)
        err = max(np.abs(a.astype(float) - b).max() / max(1, np.abs(b).max()) for a, b in zip(got, ref))
        print(f"max rel err {{err:.3g}}")
        sys.exit(0 if err <= {TOL} and len(got) == len(ref) else 1)
    """)
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "fake"))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "max rel err" in proc.stdout
