"""Marconi's policy core: plain Python, no SGLang or torch import.

Every driver (the SGLang components in a live server, the trace replay, the α
tuner's replays) uses these modules; there is no second copy of the policy.
"""

from .admission import AdmissionReason, Checkpoint, branch_point, plan_request
from .config import MarconiConfig, MarconiConfigError, parse_config
from .cost_model import BUILTIN_PROFILES, CostProfile, builtin_profile, from_hf_config
from .tuner import AlphaTuner, best_alpha
from .utility import Candidate, EvictionQueue, argmin_utility, utilities

__all__ = [
    "AdmissionReason", "Checkpoint", "branch_point", "plan_request",
    "MarconiConfig", "MarconiConfigError", "parse_config",
    "BUILTIN_PROFILES", "CostProfile", "builtin_profile", "from_hf_config",
    "AlphaTuner", "best_alpha",
    "Candidate", "EvictionQueue", "argmin_utility", "utilities",
]
