"""ST-GCN (Yan, Xiong & Lin, "Spatial Temporal Graph Convolutional Networks for Skeleton-Based Action
Recognition", AAAI 2018) on NTU RGB+D, compiled into a continual model in the spirit of CoST-GCN
(Hedegaard, Heidari & Iosifidis 2022).

    python examples/stgcn.py [--size small|full]
    cd examples && cocompile bench stgcn:full_strided      # also full_stride1, full_subsets, small_*

"full" is the paper's network on NTU-60 clips (N, C=3, T=300, V=25 joints, M=2 persons): data
BatchNorm over M*V*C, ten blocks 64-64-64-64-128-128-128-256-256-256, each a spatial graph conv with
the 3-subset spatial partitioning and learnable edge importance followed by a (9, 1) temporal conv
(padding 4, stride 2 in blocks 5 and 8), global average pooling over (T, V), the mean over persons and
a 1x1 conv classifier. "small" keeps depth, strides and skeleton with narrow blocks and T=32.

Variants: "strided" (the paper's), "stride1" (every temporal stride 1, as CoST-GCN streams it),
"matmul" (graph conv as `matmul` after `view(N, C*T, V)`, the 2s-AGCN way of writing it),
"subsets" (stride-1 ST-GCN with that graph conv: per partition subset a matmul with A_k and a 1x1
conv of its own, the three summed, then BatchNorm; the compiler merges the subsets into one
product, passes/sum_parallel_products.py) and "agcn" (2s-AGCN style: an adaptive adjacency from
embeddings averaged over the clip). The adaptive adjacency
of a frame depends on frames that have not arrived yet, so "agcn" is refused unless approximate=True,
where the average runs over the last T frames and verify measures the deviation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import cocompile
from common import Result, parse_size, randomize, state_bytes
from flops import cocompile_flops

TIME_DIM = 2
COST_GCN_FLOPS_REDUCTION = 107.7   # CoST-GCN vs ST-GCN FLOPs per prediction, NTU RGB+D, T=300
COST_GCN_CPU_SPEEDUP = 20          # CoST-GCN vs ST-GCN predictions per second on CPU
# (label, build kwargs, approximate) for the FLOPs table
VARIANTS = (("st-gcn", {"variant": "strided"}, False), ("st-gcn-s1", {"variant": "stride1"}, False),
            ("st-gcn-matmul", {"variant": "matmul"}, False), ("st-gcn-subsets", {"variant": "subsets"}, False),
            ("agcn", {"variant": "agcn"}, True))
STRIDE1 = ("stride1", "subsets")   # variants with every temporal stride 1

CONFIGS = {
    "full": dict(frames=300, widths=(64, 64, 64, 64, 128, 128, 128, 256, 256, 256), classes=60),
    "small": dict(frames=32, widths=(8, 8, 8, 8, 16, 16, 16, 24, 24, 24), classes=10),
}
STRIDES = (1, 1, 1, 1, 2, 1, 1, 2, 1, 1)    # temporal stride 2 in blocks 5 and 8 (1-based)
JOINTS, PERSONS, CHANNELS, TEMPORAL_KERNEL = 25, 2, 3, 9

# NTU RGB+D skeleton, 1-based joint pairs; joint 21 (spine at the shoulders) is the centre
NTU_EDGES = ((1, 2), (2, 21), (3, 21), (4, 3), (5, 21), (6, 5), (7, 6), (8, 7), (9, 21), (10, 9),
             (11, 10), (12, 11), (13, 1), (14, 13), (15, 14), (16, 15), (17, 1), (18, 17), (19, 18),
             (20, 19), (22, 23), (23, 8), (24, 25), (25, 12))
NTU_CENTER = 21


# -- the skeleton graph ---------------------------------------------------------------------------
def hops_to(center: int, edges, num_nodes: int) -> list[int]:
    """Graph distance of every node to `center` (0-based), by breadth-first search.

    >>> hops_to(0, [(0, 1), (1, 2)], 3)
    [0, 1, 2]
    """
    neighbours = [[] for _ in range(num_nodes)]
    for i, j in edges:
        neighbours[i].append(j)
        neighbours[j].append(i)
    dist, frontier = {center: 0}, [center]
    while frontier:
        nxt = []
        for i in frontier:
            for j in neighbours[i]:
                if j not in dist:
                    dist[j] = dist[i] + 1
                    nxt.append(j)
        frontier = nxt
    return [dist[v] for v in range(num_nodes)]


def spatial_partitions(edges=NTU_EDGES, num_nodes: int = JOINTS, center: int = NTU_CENTER) -> torch.Tensor:
    """The paper's spatial configuration partitioning, (3, V, V): subset 0 the root itself, subset 1
    the neighbours nearer the skeleton's centre than the root ("centripetal"), subset 2 those farther
    away ("centrifugal"). A[k, v, w] weighs joint v's feature in joint w's output, normalised by the
    size of w's neighbourhood (root included), so every column of A.sum(0) sums to 1.

    >>> torch.allclose(spatial_partitions().sum(dim=(0, 1)), torch.ones(25))
    True
    """
    edges = [(i - 1, j - 1) for i, j in edges]
    dist = hops_to(center - 1, edges, num_nodes)
    A = torch.zeros(3, num_nodes, num_nodes)
    A[0] = torch.eye(num_nodes)
    for i, j in edges:
        for v, w in ((i, j), (j, i)):          # v feeds root w
            A[1 if dist[v] < dist[w] else 2, v, w] = 1
    degree = A.sum(dim=(0, 1))                 # neighbourhood size of each root w
    return A / degree


# -- blocks ---------------------------------------------------------------------------------------
class GraphConv(nn.Module):
    """ST-GCN's spatial graph conv: a 1x1 conv to K*C' channels, then per subset k a sum over the
    joints with A_k * M_k (M the learnable edge importance): einsum('nkctv,kvw->nctw')."""

    def __init__(self, cin: int, cout: int, A: torch.Tensor):
        super().__init__()
        self.register_buffer("A", A)
        self.edge_importance = nn.Parameter(torch.ones_like(A))
        self.conv = nn.Conv2d(cin, cout * A.size(0), kernel_size=1)

    def forward(self, x):
        x = self.conv(x)
        n, kc, t, v = x.size()
        x = x.view(n, self.A.size(0), kc // self.A.size(0), t, v)
        return torch.einsum("nkctv,kvw->nctw", x, self.A * self.edge_importance).contiguous()


class MatmulGraphConv(nn.Module):
    """The same graph conv written as 2s-AGCN writes it: per subset, the joints mixed by
    `matmul(x.view(N, C*T, V), A_k * M_k)`, then a 1x1 conv; summed over subsets."""

    def __init__(self, cin: int, cout: int, A: torch.Tensor):
        super().__init__()
        self.register_buffer("A", A)
        self.edge_importance = nn.Parameter(torch.ones_like(A))
        self.conv = nn.ModuleList(nn.Conv2d(cin, cout, kernel_size=1) for _ in range(A.size(0)))

    def forward(self, x):
        N, C, T, V = x.size()
        A = self.A * self.edge_importance
        y = 0
        for k, conv in enumerate(self.conv):
            y = y + conv(torch.matmul(x.view(N, C * T, V), A[k]).view(N, C, T, V))
        return y


class AdaptiveGraphConv(nn.Module):
    """2s-AGCN style: A_k + B_k + C_k, B_k learned, C_k = softmax over joints of theta_k(x)^T phi_k(x)
    with the embeddings theta, phi (1x1 convs) averaged over the clip: every frame's graph depends
    on the whole clip, future frames included."""

    def __init__(self, cin: int, cout: int, A: torch.Tensor, embed_ratio: int = 4):
        super().__init__()
        K, inner = A.size(0), max(cout // embed_ratio, 1)
        self.register_buffer("A", A)
        self.B = nn.Parameter(torch.zeros_like(A))
        self.theta = nn.ModuleList(nn.Conv2d(cin, inner, 1) for _ in range(K))
        self.phi = nn.ModuleList(nn.Conv2d(cin, inner, 1) for _ in range(K))
        self.conv = nn.ModuleList(nn.Conv2d(cin, cout, 1) for _ in range(K))

    def forward(self, x):
        N, C, T, V = x.size()
        y = 0
        for k in range(self.A.size(0)):
            theta, phi = self.theta[k](x).mean(dim=2), self.phi[k](x).mean(dim=2)   # (N, C', V)
            # normalised over the joints a joint gathers from, like the columns of A
            adaptive = torch.softmax(theta.transpose(1, 2) @ phi / theta.size(1), dim=-2)
            z = torch.matmul(x.view(N, C * T, V), self.A[k] + self.B[k] + adaptive)
            y = y + self.conv[k](z.view(N, C, T, V))
        return y


GRAPH_CONVS = {"strided": GraphConv, "stride1": GraphConv, "matmul": MatmulGraphConv,
               "subsets": MatmulGraphConv, "agcn": AdaptiveGraphConv}


class STGCNBlock(nn.Module):
    """Graph conv, then BN-ReLU-(9, 1) temporal conv (stride s)-BN, plus the residual, then ReLU."""

    def __init__(self, cin: int, cout: int, A: torch.Tensor, stride: int, graph_conv, residual=True):
        super().__init__()
        self.gcn = graph_conv(cin, cout, A)
        self.tcn = nn.Sequential(
            nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, (TEMPORAL_KERNEL, 1), (stride, 1), ((TEMPORAL_KERNEL - 1) // 2, 0)),
            nn.BatchNorm2d(cout), nn.Dropout(0.5, inplace=True))
        if not residual:
            self.residual = lambda x: 0
        elif cin == cout and stride == 1:
            self.residual = lambda x: x
        else:
            self.residual = nn.Sequential(nn.Conv2d(cin, cout, 1, (stride, 1)), nn.BatchNorm2d(cout))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.tcn(self.gcn(x)) + self.residual(x))


class STGCN(nn.Module):
    """Input (N, C, T, V, M) -> class scores (N, classes)."""

    def __init__(self, frames, widths, classes, strides=STRIDES, graph_conv=GraphConv):
        super().__init__()
        A = spatial_partitions()
        self.data_bn = nn.BatchNorm1d(PERSONS * JOINTS * CHANNELS)
        chans = (CHANNELS, *widths)
        self.blocks = nn.ModuleList(
            STGCNBlock(chans[i], chans[i + 1], A, s, graph_conv, residual=i > 0) for i, s in enumerate(strides))
        self.fcn = nn.Conv2d(widths[-1], classes, kernel_size=1)

    def forward(self, x):
        N, C, T, V, M = x.size()
        x = x.permute(0, 4, 3, 1, 2).contiguous().view(N, M * V * C, T)
        x = self.data_bn(x)
        x = x.view(N, M, V, C, T).permute(0, 1, 3, 4, 2).contiguous().view(N * M, C, T, V)
        for block in self.blocks:
            x = block(x)
        x = F.avg_pool2d(x, x.size()[2:])            # over (T, V)
        x = x.view(N, M, -1, 1, 1).mean(dim=1)       # over persons
        return self.fcn(x).view(N, -1)


# -- building -------------------------------------------------------------------------------------
def build(size: str = "small", variant: str = "strided", seed: int = 0) -> STGCN:
    """ST-GCN in eval mode with random weights, BatchNorm statistics and edge importance.

    >>> model = build("small", "stride1")
    >>> model(example_input("small")).shape
    torch.Size([1, 10])
    """
    cfg = CONFIGS[size]
    strides = (1,) * len(STRIDES) if variant in STRIDE1 else STRIDES
    model = randomize(STGCN(**cfg, strides=strides, graph_conv=GRAPH_CONVS[variant]), seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("edge_importance"):    # around 1, as after training
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif name.endswith(".B"):               # a small learned graph on top of A
                p.copy_(0.05 * torch.rand(p.shape, generator=g))
    return model


def example_input(size: str = "small", batch: int = 1, seed: int = 0) -> torch.Tensor:
    """A random skeleton clip (N, C=3, T, V=25, M=2) of the size the model was built for."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, CHANNELS, CONFIGS[size]["frames"], JOINTS, PERSONS, generator=g)


# factories for `cocompile bench stgcn:full_strided` (run from examples/); they carry the example clip
def full_strided():
    return build("full", "strided"), example_input("full")


def full_stride1():
    return build("full", "stride1"), example_input("full")


def full_subsets():
    return build("full", "subsets"), example_input("full")


def small_strided():
    return build("small", "strided"), example_input("small")


def small_stride1():
    return build("small", "stride1"), example_input("small")


def small_subsets():
    return build("small", "subsets"), example_input("small")


# -- running --------------------------------------------------------------------------------------
def run(name: str, model, clip, approximate: bool = False) -> Result:
    """Compile, verify E1 (no sliding-window check: slow at T=300, and not exact for padded convs),
    count FLOPs, print a summary."""
    co = cocompile.compile(model, clip, time_dim=TIME_DIM, approximate=approximate)
    report = cocompile.verify(model, co, clip, sliding_steps=0)
    flops = cocompile_flops(model, co, clip)
    with torch.no_grad():
        scale = float(model(clip).abs().max())
    kind = "approximate (measured)" if report.approximate else "exact"
    print(f"== {name}  input {tuple(clip.shape)}")
    print(f"step_frames {co.step_frames}  delay {co.delay}  receptive field {co.receptive_field}  "
          f"state {state_bytes(co) / 1024:.1f} KiB per stream ({len(co.specs)} tensors)")
    print(f"E1 max |err| {report.max_error('E1'):.3g}  ({kind}; max |output| {scale:.3g})")
    print(f"FLOPs per clip {flops.clip / 1e9:.3f} G, per step {flops.step / 1e6:.2f} M, "
          f"ideal {flops.ideal / 1e6:.2f} M, ratio {flops.ratio:.3f}")
    return Result(name, model, clip, co, report, flops, scale)


def stgcn_variants(size: str) -> dict:
    """Strided, stride-1, matmul and per-subset ST-GCN compiled and verified, and the FLOPs per
    prediction of the stride-1 continual model against the clip of the original strided ST-GCN."""
    clip = example_input(size)
    out = {v: run(f"ST-GCN ({size}, {v})", build(size, v), clip)
           for v in ("strided", "stride1", "matmul", "subsets")}
    out["reduction"] = out["strided"].flops.clip / out["stride1"].flops.step
    print(f"\nFLOPs per prediction: strided ST-GCN clip {out['strided'].flops.clip / 1e9:.3f} G / "
          f"stride-1 continual step {out['stride1'].flops.step / 1e6:.2f} M = {out['reduction']:.1f}x "
          f"(CoST-GCN paper: {COST_GCN_FLOPS_REDUCTION}x)\n")
    return out


def agcn(size: str) -> dict:
    """The AGCN variant: refused without approximate=True, compiled with it, deviation measured."""
    model, clip = build(size, "agcn"), example_input(size)
    try:
        cocompile.compile(model, clip, time_dim=TIME_DIM)
        refusal = None
    except cocompile.CompileError as err:
        refusal = err
        print(f"== AGCN ({size}) without approximate=True is refused:\n{err}\n")
    result = run(f"AGCN ({size}, approximate)", model, clip, approximate=True)
    print(f"relative E1 deviation {result.report.max_error('E1') / max(1.0, result.out_scale):.3g}")
    return {"refusal": refusal, "approximate": result}


def main(argv=None) -> dict:
    """All five variants at `--size` (see the module docstring)."""
    size = parse_size(argv, __doc__)
    return {**stgcn_variants(size), **agcn(size)}


if __name__ == "__main__":
    main()
