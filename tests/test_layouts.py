"""Time through merged layouts: ST-GCN style views (time merged with persons, joints, channels),
einsum and matmul graph convolutions, persons folded into the batch, time folded into the batch
(per-frame 2D CNNs), and time on the last axis. Oracle: the offline model (E1)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cocompile


def randomise_bn(model):
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    return model.eval()


class GraphBlock(nn.Module):
    """Spatial graph conv over joints (3 partitions, learnable edge importance), then a (9, 1)
    temporal conv; residual with optional temporal stride."""

    def __init__(self, cin, cout, V, stride=1, matmul=False):
        super().__init__()
        self.matmul = matmul
        self.register_buffer("A", torch.rand(3, V, V))
        self.importance = nn.Parameter(torch.rand(3, V, V) + 0.5)
        self.gcn = nn.Conv2d(cin, cout * 3, 1)
        self.tcn = nn.Sequential(nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.Conv2d(cout, cout, (9, 1), (stride, 1), (4, 0)), nn.BatchNorm2d(cout))
        self.res = (nn.Sequential(nn.Conv2d(cin, cout, 1, (stride, 1)), nn.BatchNorm2d(cout))
                    if cin != cout or stride != 1 else nn.Identity())

    def forward(self, x):
        n, c, t, v = x.shape
        y = self.gcn(x).view(n, 3, -1, t, v)
        A = self.A * self.importance
        if self.matmul:     # matmul after a view that merges channels with time
            y = y.permute(0, 2, 3, 1, 4).reshape(n, -1, 3 * v) @ A.reshape(3 * v, v)
            y = y.view(n, -1, t, v)
        else:
            y = torch.einsum("nkctv,kvw->nctw", y, A)
        return F.relu(self.tcn(y) + self.res(x))


class TinySTGCN(nn.Module):
    def __init__(self, matmul=False, strides=(1, 2, 1), C=3, V=5):
        super().__init__()
        M = 2
        self.data_bn = nn.BatchNorm1d(C * V * M)
        ch = [C, 8, 16, 16]
        self.blocks = nn.ModuleList(GraphBlock(ch[i], ch[i + 1], V, s, matmul) for i, s in enumerate(strides))
        self.fc = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        N, C, T, V, M = x.size()
        x = x.permute(0, 4, 3, 1, 2).contiguous().view(N, M * V * C, T)
        x = self.data_bn(x)
        x = x.view(N, M, V, C, T).permute(0, 1, 3, 4, 2).contiguous().view(N * M, C, T, V)
        for block in self.blocks:
            x = block(x)
        x = F.avg_pool2d(x, x.size()[2:])
        x = x.view(N, M, -1, 1, 1).mean(dim=1)
        return self.fc(x).view(x.size(0), -1)


@pytest.mark.parametrize("matmul", [False, True])
@pytest.mark.parametrize("strides", [(1, 2, 1), (1, 1, 1)])
def test_stgcn_style_views_and_graph_convs(matmul, strides):
    torch.manual_seed(0)
    model = randomise_bn(TinySTGCN(matmul, strides))
    clip = torch.randn(2, 3, 16, 5, 2)
    co = cocompile.compile(model, clip[:1], time_dim=2)
    assert co.step_frames == (2 if 2 in strides else 1)
    report = cocompile.verify(model, co, clip)
    assert report.passed, report
    assert any(s.fold == 2 for s in co.specs), "persons folded into the batch are kept per stream"


class PerFrame2DThenTemporal(nn.Module):
    """TSN/R(2+1)D style: time folded into the batch for a 2D CNN, unfolded for a temporal conv."""

    def __init__(self):
        super().__init__()
        self.spatial = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.temporal = nn.Conv3d(6, 6, (3, 1, 1), padding=(1, 0, 0))

    def forward(self, x):
        B, C, T, H, W = x.shape
        y = self.spatial(x.transpose(1, 2).reshape(B * T, C, H, W))
        y = y.view(B, T, 6, H, W).transpose(1, 2)
        y = self.temporal(y)
        return y, y.mean((2, 3, 4))


def test_time_folded_into_batch_for_per_frame_layers():
    torch.manual_seed(1)
    model = randomise_bn(PerFrame2DThenTemporal())
    clip = torch.randn(2, 3, 8, 6, 6)
    co = cocompile.compile(model, clip[:1])
    assert cocompile.verify(model, co, clip).passed


class TimeLast(nn.Module):
    """(N, features, T) sensor layout with a layer norm over features per frame."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 8, 3, padding=2, dilation=2)
        self.norm = nn.LayerNorm(8)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        y = self.norm(self.conv(x).transpose(1, 2))   # (N, T, 8)
        return self.out(torch.relu(y))                 # per-frame logits (N, T, 2)


def test_time_on_last_axis_with_per_frame_norm_and_linear():
    torch.manual_seed(2)
    model = TimeLast().eval()
    clip = torch.randn(3, 4, 12)
    co = cocompile.compile(model, clip[:1], time_dim=2)
    assert cocompile.verify(model, co, clip).passed


class GatedTCN(nn.Module):
    """GLU gating over channels and in-place activations: ops that only the core-ATen
    decomposition expresses in ruled ops (the compiler falls back to it)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 8, 3, padding=2, dilation=2)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.act(F.glu(self.conv(x), dim=1))


def test_ops_without_rules_fall_back_to_their_decomposition():
    torch.manual_seed(3)
    model = GatedTCN().eval()
    clip = torch.randn(2, 3, 10)
    co = cocompile.compile(model, clip[:1])
    assert cocompile.verify(model, co, clip).passed
