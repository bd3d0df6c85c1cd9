"""Capture accepts what users hold: an nn.Module, a torch.export program, or its module()."""
import torch
from torch import nn

import cocompile


def test_exported_program_and_its_module_compile_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv1d(4, 4, 3, stride=2)).eval()
    clip = torch.randn(1, 3, 8)
    ep = torch.export.export(model, (clip,))
    for source in (ep, ep.module()):
        co = cocompile.compile(source, clip)
        torch.testing.assert_close(co.forward_steps(clip), model(clip), rtol=0, atol=1e-5)
    batch = torch.randn(3, 3, 8)       # the program itself carries no batch guard any more
    torch.testing.assert_close(cocompile.compile(ep, clip).forward_steps(batch), model(batch),
                               rtol=0, atol=1e-5)
