"""cocompile: compile offline clip models into exact continual (streaming) models."""
__version__ = "0.1.0"

try:
    import torch as _torch  # noqa: F401
except ImportError:  # a deployment without torch: only cocompile.runtime (numpy + onnxruntime) works
    _torch = None

if _torch is not None:
    from .compiler import compile
    from .errors import CompileError
    from .inspect import Inspection, count_flops, inspect
    from .model import ContinualModel
    from .ops.registry import OpRule, StateSpec, register_op
    from .timeinfo import TimeInfo
    from .verify import Report, verify

__all__ = ["compile", "CompileError", "ContinualModel", "OpRule", "StateSpec", "register_op",
           "TimeInfo", "verify", "Report", "inspect", "Inspection", "count_flops",
           "__version__"]
