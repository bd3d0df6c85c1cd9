"""ST-GCN (examples/stgcn.py) at the paper's size: full widths, NTU-60 clips of T=300 frames, random
weights, edge importance and BatchNorm statistics. Stepping reproduces the offline model (E1) for the
strided, stride-1, matmul-after-view and per-subset variants; the default step is the lcm of the temporal strides;
a step costs the frames it brings in; the adaptive-graph (AGCN) variant is refused unless approximate,
and then its deviation is measured. Oracle: the untouched offline model.

Most of the ~3 minutes is torch.export capturing the ten-block graphs (~25-35 s each on one thread),
so the AGCN variant, which must be captured twice (refusal, then approximate), runs at the small size.
"""
import functools
import math
import os
import sys

import pytest
import torch

import cocompile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
import stgcn  # noqa: E402

EXACT = ("strided", "stride1", "matmul", "subsets")


@functools.cache
def variants() -> dict:
    """What `python examples/stgcn.py --size full` computes for the three exact variants."""
    torch.set_num_threads(1)
    return stgcn.stgcn_variants("full")


@functools.cache
def agcn() -> dict:
    """The AGCN part of `python examples/stgcn.py --size small`."""
    return stgcn.agcn("small")


def test_ntu_graph_spatial_partitions():
    A = stgcn.spatial_partitions()
    assert A.shape == (3, 25, 25)
    assert torch.equal(A[0] > 0, torch.eye(25, dtype=torch.bool))          # the root subset
    assert (A[1] > 0).sum() == (A[2] > 0).sum() == 24                     # each edge once each way
    assert not ((A[1] > 0) & (A[2] > 0)).any()
    assert torch.equal((A[1] > 0).T, A[2] > 0)     # v nearer the centre than w <=> w farther than v
    assert torch.allclose(A.sum(dim=(0, 1)), torch.ones(25))             # each root's mean
    # the centre (joint 21) has no centripetal neighbour; a hand tip only a centripetal one
    assert A[1, :, 20].sum() == 0 and A[2, :, 21].sum() == 0


def test_shapes_and_strides_of_the_full_model():
    model = stgcn.build("full", "strided")
    assert [b.tcn[2].stride[0] for b in model.blocks] == [1, 1, 1, 1, 2, 1, 1, 2, 1, 1]
    assert [b.tcn[2].out_channels for b in model.blocks] == [64, 64, 64, 64, 128, 128, 128, 256, 256, 256]
    assert stgcn.example_input("full").shape == (1, 3, 300, 25, 2)


@pytest.mark.parametrize("variant", EXACT)
def test_stepping_reproduces_the_offline_model_at_T300(variant):
    r = variants()[variant]
    assert r.clip.shape[2] == r.co.clip_length == 300
    assert r.report.passed and not r.report.approximate, str(r.report)
    assert r.report.max_error("E1") <= 1e-4 * max(1.0, r.out_scale)
    assert r.out_scale > 1e-1          # the outputs are not vanishingly small: the check has teeth


@pytest.mark.parametrize("variant", ("strided", "matmul"))
def test_streams_are_independent_in_a_batch(variant):
    """Independent of verify(): a different batch of two clips, persons folded into the batch."""
    r = variants()[variant]
    clip = stgcn.example_input("full", batch=2, seed=1)
    with torch.no_grad():
        ref, got = r.model(clip), r.co.forward_steps(clip)
    assert ref.shape == got.shape == (2, 60)
    assert (ref - got).abs().max() <= 1e-4 * max(1.0, float(ref.abs().max()))


def test_default_step_is_the_product_of_the_temporal_strides():
    got = {v: variants()[v].co.step_frames for v in EXACT}
    assert got == {"strided": 4, "stride1": 1, "matmul": 4, "subsets": 1}


def test_per_subset_graph_convs_compile_to_the_stride1_products():
    """2s-AGCN's per-subset form (a matmul with A_k and a conv per subset, summed) becomes one
    product over the stacked subsets, with BatchNorm folded in: the same convs and einsums as
    ST-GCN's own graph conv, no matmul, no multiply left per block."""
    def ops(variant):
        gm = variants()[variant].co.program.gm
        return {op: sum(n.target is op for n in gm.graph.nodes) for op in (
            torch.ops.aten.conv2d.default, torch.ops.aten.einsum.default, torch.ops.aten.matmul.default,
            torch.ops.aten.mul.Tensor, torch.ops.aten.batch_norm.default)}
    assert ops("subsets") == ops("stride1")
    assert ops("subsets")[torch.ops.aten.matmul.default] == 0
    assert ops("subsets")[torch.ops.aten.einsum.default] == 10


@pytest.mark.parametrize("variant", EXACT)
def test_step_flops_match_the_frames_it_reads(variant):
    f = variants()[variant].flops
    assert f.step > 0
    assert f.ratio <= 1.1, f"step {f.step} vs clip {f.clip} * {f.step_frames} / {f.clip_length}"


def test_stride1_step_against_the_strided_clip():
    """CoST-GCN reports 107.7x fewer FLOPs per prediction than ST-GCN at T=300."""
    out = variants()
    assert out["reduction"] == out["strided"].flops.clip / out["stride1"].flops.step
    assert 90 < out["reduction"] < 130


def test_agcn_is_refused_without_approximate():
    err = agcn()["refusal"]
    assert isinstance(err, cocompile.CompileError)
    assert "blocks.0.gcn" in str(err) and "approximate=True" in str(err)


def test_agcn_approximate_reports_its_measured_deviation():
    r = agcn()["approximate"]
    assert r.co.approximate and r.report.approximate
    assert not any(c.claimed for c in r.report.checks if c.name == "E1")
    err = r.report.max_error("E1")
    assert math.isfinite(err) and err > 0
    with torch.no_grad():      # the reported deviation is the real one
        real = float((r.co.forward_steps(r.clip) - r.model(r.clip)).abs().max())
    assert err == pytest.approx(real, rel=1e-3, abs=1e-7)
    assert r.flops.ratio <= 1.1


def test_stride1_onnx_step_stays_channels_last(tmp_path, monkeypatch):
    """Every conv of a stride-1 ST-GCN is a channels-last product (1x1 graph convs, temporal convs
    with rows state), so its ONNX step takes the eager forms, not the captured ones: Gemm and
    MatMul, no Einsum; the delays keep rows too, the Transposes between products sink through
    the elementwise ops and cancel (onnx_transposes), and states are sliced straight into the
    outputs (onnx_reshapes). E4 holds. Three blocks (no residual, identity, 1x1 conv residual)."""
    import onnx
    import onnx_graphsurgeon as gs

    from cocompile.export import onnx_portable
    from cocompile.onnx_reshapes import tidy_reshapes
    from cocompile.ops.conv_forms import FORCE_ENV
    from common import randomize
    from test_export import e4

    monkeypatch.setenv(FORCE_ENV, "fold-mm,mm")    # (measured forms may differ from machine to machine)
    model = randomize(stgcn.STGCN(frames=16, widths=(8, 8, 16), classes=5, strides=(1, 1, 1)))
    co = cocompile.compile(model, torch.randn(1, 3, 16, 25, 2))
    assert not onnx_portable(co)
    path = str(co.export(tmp_path / "co.onnx"))
    assert e4(co, path) <= 1e-5
    nodes = onnx.load(path).graph.node
    ops = [n.op_type for n in nodes]
    producer = {o: n.op_type for n in nodes for o in n.output}
    assert "Einsum" not in ops and ops.count("Gemm") == 7 and ops.count("MatMul") == 3
    # the input's and the head's Transposes are left (the eager forms alone leave four per block)
    assert ops.count("Transpose") <= 2
    graph = gs.import_onnx(onnx.load(path))
    assert tidy_reshapes(graph, "batch") == 0
    delays = [s for s in co.specs if s.name.endswith(".delay")]
    assert delays and all(s.shape[-3:-1] == (25, 4) for s in delays)     # (persons, V, frames, C)
    # windows are sliced and delays concatenated straight into the state outputs (a Reshape into
    # an output is one copy more; the head's window is also read by its mean, so its Slice stays
    # inside); a delay's leaving frame is sliced from the state input, not from the FIFO written anew
    outputs = [o.name for o in onnx.load(path).graph.output]
    windows = [o for o in outputs if ".tcn." in o]
    fifos = [o for o in outputs if o.endswith(".delay")]
    assert len(windows) == 3 and all(producer[w] == "Slice" for w in windows)
    assert len(fifos) == 2 and all(producer[f] == "Concat" for f in fifos)
    made_by = {o: n for n in nodes for o in n.output}
    for f in fifos:                 # the kept frames: slices (and free Reshapes) of the state input
        kept = made_by[f].input[0]
        while kept in made_by and made_by[kept].op_type in ("Slice", "Reshape"):
            kept = made_by[kept].input[0]
        assert kept == f.replace("next_state.", "state.")
