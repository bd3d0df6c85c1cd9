"""fold_batchnorm: conv -> BatchNorm pairs become one conv; the graph still computes the model."""
import torch
from torch import nn

import cocompile
from cocompile.capture import capture
from cocompile.passes.fold_batchnorm import fold_batchnorm


def bn(c):
    m = nn.BatchNorm3d(c)
    m.running_mean.uniform_(-1, 1)
    m.running_var.uniform_(0.5, 2)
    m.weight.data.uniform_(0.5, 1.5)
    m.bias.data.uniform_(-0.5, 0.5)
    return m


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1, bias=False), bn(4), nn.ReLU())
        self.b = nn.Conv3d(4, 4, (3, 1, 1), padding=(1, 0, 0))
        self.bn_b = bn(4)
        self.c = nn.Conv3d(4, 4, 1)
        self.bn_c = bn(4)

    def forward(self, x):
        y = self.a(x)
        z = self.b(y)
        return self.bn_b(z), self.bn_c(self.c(y)) + z     # b's output has two users: not folded


def run(cap, x):
    args = [x if n.name == cap.input_name else cap.consts[n.name]
            for n in cap.gm.graph.nodes if n.op == "placeholder"]
    return cap.gm(*args)


def test_folds_single_user_convs_and_keeps_the_function():
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 2, 6, 5, 5)
    cap = capture(model, x[:1], 2)
    assert fold_batchnorm(cap.gm, cap.consts) == 3
    # bn_b reads a conv with two users: it becomes x * scale + shift instead
    assert not [n for n in cap.gm.graph.nodes if n.target is torch.ops.aten.batch_norm.default]
    mul = [n for n in cap.gm.graph.nodes if n.target is torch.ops.aten.mul.Tensor]
    assert len(mul) == 1 and mul[0].args[0].target is torch.ops.aten.conv3d.default
    assert "bn_b" in str(mul[0].meta.get("nn_module_stack"))    # errors still name the module
    for got, ref in zip(run(cap, x), model(x)):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert fold_batchnorm(cap.gm, cap.consts) == 0         # a second run changes nothing


def test_compiled_model_with_folded_batchnorm_is_exact():
    torch.manual_seed(1)
    model = Net().eval()
    clip = torch.randn(2, 2, 8, 5, 5)
    co = cocompile.compile(model, clip[:1])
    assert not any(n.target is torch.ops.aten.batch_norm.default and "a." in str(n.meta.get("nn_module_stack"))
                   for n in co.program.gm.graph.nodes)
    assert cocompile.verify(model, co, clip).passed


class Upsampler(nn.Module):
    """Transposed convs (grouped, along time and other axes) followed by BatchNorm."""

    def __init__(self):
        super().__init__()
        self.up1 = nn.ConvTranspose3d(4, 6, (4, 3, 3), stride=(2, 1, 1), padding=1, groups=2)
        self.bn1 = bn(6)
        self.up2 = nn.ConvTranspose3d(6, 6, (3, 1, 1), padding=(1, 0, 0), groups=3, bias=False)
        self.bn2 = bn(6)

    def forward(self, x):
        return self.bn2(self.up2(torch.relu(self.bn1(self.up1(x)))))


def _as_convolution(gm):
    """conv_transpose3d nodes rewritten as aten.convolution(transposed=True), the form some
    export paths give."""
    from cocompile.ops.upsample import transposed_args
    for node in gm.graph.nodes:
        if node.target is torch.ops.aten.conv_transpose3d.input:
            a = transposed_args(node)
            node.target = torch.ops.aten.convolution.default
            node.args = (a["input"], a["weight"], a["bias"], a["stride"], a["padding"], a["dilation"], True,
                         a["output_padding"], a["groups"])
    gm.recompile()


def test_folds_batchnorm_into_grouped_transposed_convs():
    torch.manual_seed(2)
    model = Upsampler().eval()
    x = torch.randn(2, 4, 4, 3, 3)
    for as_convolution in (False, True):
        cap = capture(model, x[:1], 2)
        if as_convolution:
            _as_convolution(cap.gm)
        assert fold_batchnorm(cap.gm, cap.consts) == 2
        assert not [n for n in cap.gm.graph.nodes if n.target in (torch.ops.aten.batch_norm.default,
                                                                  torch.ops.aten.mul.Tensor)]
        torch.testing.assert_close(run(cap, x)[0], model(x), rtol=1e-5, atol=1e-5)
    co = cocompile.compile(model, x[:1], trace=False)
    assert cocompile.verify(model, co, x).passed


class GraphConvBN(nn.Module):
    """ST-GCN's graph conv (a 1x1 conv with bias, then einsum over subsets and joints) and
    2s-AGCN's summed subsets, each followed by BatchNorm."""

    def __init__(self):
        super().__init__()
        self.register_buffer("A", torch.rand(3, 5, 5))
        self.gcn = nn.Conv2d(4, 3 * 6, 1)
        self.bn_a = nn.BatchNorm2d(6)
        self.subsets = nn.ModuleList(nn.Conv2d(6, 6, 1) for _ in range(3))
        self.bn_b = nn.BatchNorm2d(6)
        for m in (self.bn_a, self.bn_b):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)

    def forward(self, x):
        n, _, t, v = x.shape
        y = torch.relu(self.bn_a(torch.einsum("nkctv,kvw->nctw", self.gcn(x).view(n, 3, 6, t, v), self.A)))
        z = 0
        for k, conv in enumerate(self.subsets):
            z = z + conv(torch.matmul(y.view(n, 6 * t, v), self.A[k]).view(n, 6, t, v))
        return self.bn_b(z)


def test_folds_batchnorm_into_graph_products():
    """BatchNorm after a graph product (passes/graph_products.py) goes into its weight and the
    bias it adds after: no batch_norm and no multiply left, in the pipeline's pass order."""
    from cocompile.passes.commute_graph_products import commute_graph_products
    from cocompile.passes.sum_parallel_products import sum_parallel_products
    from test_sum_parallel_products import captured

    torch.manual_seed(3)
    model = GraphConvBN().eval()
    x = torch.randn(2, 4, 3, 5)
    cap = captured(model, x[:1], 2)
    sum_parallel_products(cap.gm, cap.consts)
    commute_graph_products(cap.gm, cap.consts)
    before = run(cap, x)[0]
    assert fold_batchnorm(cap.gm, cap.consts) == 2
    assert not [n for n in cap.gm.graph.nodes if n.target in (torch.ops.aten.batch_norm.default,
                                                              torch.ops.aten.mul.Tensor)]
    torch.testing.assert_close(run(cap, x)[0], before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(run(cap, x)[0], model(x), rtol=1e-5, atol=1e-5)
    assert fold_batchnorm(cap.gm, cap.consts) == 0
