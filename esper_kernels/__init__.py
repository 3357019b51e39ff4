"""esper_kernels: a fused, honest PPO loss for factored (multi-head, masked) action spaces.

>>> import esper_kernels as ek
>>> layout = ek.HeadLayout({"op": 6, "slot": 3})
"""

from .backends import BackendInfo, BackendUnavailableError, available_backends
from .config import PPOLossConfig
from .layout import ESPER_HEADS, HeadLayout
from .loss import FactoredPPOLoss, PPOLossOutput, ppo_loss
from .metrics import GLOBAL_METRICS, HEAD_METRICS, PPOMetrics

__version__ = "0.1.0"

__all__ = [
    "BackendInfo",
    "BackendUnavailableError",
    "ESPER_HEADS",
    "FactoredPPOLoss",
    "GLOBAL_METRICS",
    "HEAD_METRICS",
    "HeadLayout",
    "PPOLossConfig",
    "PPOLossOutput",
    "PPOMetrics",
    "available_backends",
    "ppo_loss",
    "__version__",
]
