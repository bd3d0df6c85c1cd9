"""Arguments of an ATen call by name, defaults filled in from the op's schema."""
from __future__ import annotations


def bind(target, args, kwargs) -> dict:
    """{argument name: value} for a call of `target` (an OpOverload).

    >>> bind(torch.ops.aten.max_pool1d.default, (x, [3]), {})["stride"]
    []
    """
    out = {}
    for i, a in enumerate(target._schema.arguments):
        if i < len(args):
            out[a.name] = args[i]
        elif a.name in kwargs:
            out[a.name] = kwargs[a.name]
        elif a.has_default_value():
            out[a.name] = a.default_value
    return out


def call(target, values: dict):
    """Call `target` with arguments by schema position."""
    return target(*[values[a.name] for a in target._schema.arguments if a.name in values
                    and not a.kwarg_only],
                  **{a.name: values[a.name] for a in target._schema.arguments
                     if a.kwarg_only and a.name in values})
