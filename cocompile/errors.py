"""Errors that point at the user's model, not at cocompile's or torch's internals."""
from __future__ import annotations

import os
import re

import torch

_TORCH_DIR = os.path.dirname(torch.__file__)
_OWN_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)')


class CompileError(Exception):
    """The model cannot be made continual as asked; the message says why and what to do.

    >>> raise CompileError("no rule for aten.foo", op="aten.foo", module="blocks.0 (Conv3d)",
    ...                    hint="register one with cocompile.register_op")
    Traceback (most recent call last):
    cocompile.errors.CompileError: no rule for aten.foo ...
    """

    def __init__(self, reason: str, *, op: str | None = None, module: str | None = None,
                 source: str | None = None, hint: str | None = None, no_rule: bool = False):
        self.reason, self.op, self.module, self.source, self.hint = reason, op, module, source, hint
        self.no_rule = no_rule
        lines = [reason]
        if op:
            lines.append(f"  op:     {op}")
        if module:
            lines.append(f"  module: {module}")
        if source:
            lines.append(f"  source: {source}")
        if hint:
            lines.append(f"  fix:    {hint}")
        super().__init__("\n".join(lines))


class Refusal(Exception):
    """Raised by an op rule: why this node cannot be continual, and the fix. Gets the node's location
    attached by the analysis and becomes a CompileError."""

    def __init__(self, reason: str, hint: str | None = None):
        super().__init__(reason)
        self.reason, self.hint = reason, hint


class NoRule(Refusal):
    """No rule knows this op; a finer-grained (decomposed) graph may still be compiled."""


def first_line(err) -> str:
    """The first line of an exception's message (or of a text), for a one-line reason; the
    exception's type where it has no message."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def module_of(node: torch.fx.Node) -> str:
    """`blocks.2.conv_a (Conv3d)` for the innermost user module that produced `node`."""
    stack = node.meta.get("nn_module_stack") or {}
    for path, cls in reversed(list(stack.values())):
        if path and not path.startswith("_"):
            return f"{path} ({str(cls).rsplit('.', 1)[-1]})"
    return "<top-level forward>"


def module_path(node: torch.fx.Node) -> str:
    """Dotted path of the innermost user module of `node` ('' at the top level)."""
    stack = node.meta.get("nn_module_stack") or {}
    for path, _ in reversed(list(stack.values())):
        if path and not path.startswith("_"):
            return path
    return ""


def source_of(node: torch.fx.Node) -> str | None:
    """`file.py:12  y = self.conv(x)`: the innermost frame of the user's code (not torch's, not ours)."""
    frames = _FRAME.findall(node.meta.get("stack_trace") or "")
    user = [f for f in frames if not f[0].startswith((_TORCH_DIR, _OWN_DIR)) or "/tests/" in f[0]
            or "/examples/" in f[0]]
    if not user:
        return None
    file, line, _, code = user[-1]
    return f"{os.path.relpath(file) if not file.startswith('<') else file}:{line}  {code.strip()}"


def op_name(node: torch.fx.Node) -> str:
    """`aten.convolution.default`, or the function name for Python callables."""
    target = node.target
    return str(target) if isinstance(target, torch._ops.OpOverload) else getattr(target, "__name__", str(target))


def error_at(node: torch.fx.Node, reason: str, hint: str | None = None,
             no_rule: bool = False) -> CompileError:
    """A CompileError located at `node`: op, module path and class, user's source line."""
    return CompileError(reason, op=op_name(node), module=module_of(node), source=source_of(node),
                        hint=hint, no_rule=no_rule)
