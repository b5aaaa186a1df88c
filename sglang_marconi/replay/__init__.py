"""Trace replay: hit rate, FLOPs saved and modeled TTFT of Marconi vs SGLang's own
hybrid cache (and the paper's baselines) on real traces.

    python -m sglang_marconi.replay --trace sharegpt --model paper-7b --sweep frac=0.05,0.1,0.2

See README.md in this folder.
"""

from .loaders import LoadOptions, Request, Trace, TraceError, load_trace
from .policies import POLICIES, Budget, PolicyError, PolicyOptions, build_policy
from .runner import main, replay_one, run_jobs

__all__ = [
    "LoadOptions", "Request", "Trace", "TraceError", "load_trace",
    "POLICIES", "Budget", "PolicyError", "PolicyOptions", "build_policy",
    "main", "replay_one", "run_jobs",
]
