"""Property tests: random temporal architectures stream exactly like the offline model.

Oracle: the untouched offline model. E1 (step through the clip, flush) for every architecture;
E2 (sliding window == model on the last T frames) for every architecture without zero padding.
The input's batch axis is 0 or another axis (time-major and other layouts, compiled with the
matching batch_dim); per-frame outputs come back in that layout.
"""
import os

from hypothesis import HealthCheck, given, settings

import cocompile
from archs import architectures, axes, model_and_clip, one_stream

EXAMPLES = int(os.environ.get("COCOMPILE_PROPERTY_EXAMPLES", "200"))


@settings(max_examples=EXAMPLES, deadline=None, derandomize=bool(os.environ.get("CI")),
          suppress_health_check=list(HealthCheck), print_blob=True)
@given(architectures(layouts=True))
def test_random_architectures_are_exact(arch):
    spec, padded, T = arch
    model, clip = model_and_clip(spec, T)
    # verify() below is compile's own E1 check and more (two streams, E2), so compile skips it
    time_dim, batch_dim = axes(spec)
    co = cocompile.compile(model, one_stream(spec, clip), time_dim=time_dim, batch_dim=batch_dim,
                           trace=False, verify=False)
    report = cocompile.verify(model, co, clip)
    assert report.passed, f"{spec}\n{report}"
    assert all(c.claimed for c in report.checks if c.name == "E1")
    if not padded:
        assert co.exact_sliding, "an unpadded model must claim sliding-window exactness"
    e2 = [c for c in report.checks if c.name == "E2"]
    if not padded and e2:
        assert all(c.claimed and c.ok for c in e2), f"{spec}\n{report}"
