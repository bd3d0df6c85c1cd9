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
