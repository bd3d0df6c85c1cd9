"""Per-op rules (time-axis analysis and continual step form), registered by importing them."""
from . import attention, clip, convert, delay, layout, linalg, norms, pointwise, shift, upsample, window  # noqa: F401
from . import recurrent  # noqa: F401
from .delay import delay_frames
from .registry import RULES, OpRule, StateSpec, register_op, rule_for

__all__ = ["OpRule", "StateSpec", "register_op", "rule_for", "RULES", "delay_frames"]
