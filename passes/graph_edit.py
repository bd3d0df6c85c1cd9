"""What the rewrites share. When they add a node, it takes its value and its place in the user's
source (module path, source line, for error messages) from the node it stands for, never that
node's cocompile annotations, which the analyses recompute. When they read one, `const` says
whether it is a constant of the graph (a placeholder with a tensor in `consts`)."""
from __future__ import annotations

from torch import fx


def inherit(new: fx.Node, old: fx.Node, val=None, source: fx.Node | None = None) -> fx.Node:
    """Copy `old`'s meta onto `new` (cocompile's keys left out); `val` replaces the value, and
    `source` gives the module path and source line instead of `old`'s."""
    new.meta.update({k: v for k, v in old.meta.items() if not k.startswith("cocompile.")})
    if source is not None:
        new.meta.update(nn_module_stack=source.meta.get("nn_module_stack", {}),
                        stack_trace=source.meta.get("stack_trace"))
    if val is not None:
        new.meta["val"] = val
    return new


def const(node, consts: dict):
    """The tensor of a constant placeholder, else None."""
    return consts.get(node.name) if isinstance(node, fx.Node) and node.op == "placeholder" else None
