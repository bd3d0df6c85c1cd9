"""cocompile: compile offline clip models into exact continual (streaming) models."""
from .compiler import compile
from .errors import CompileError
from .model import ContinualModel
from .ops.registry import OpRule, StateSpec, register_op
from .timeinfo import TimeInfo
from .verify import Report, verify

__version__ = "0.1.0"

__all__ = ["compile", "CompileError", "ContinualModel", "OpRule", "StateSpec", "register_op",
           "TimeInfo", "verify", "Report", "__version__"]
