"""Loss balancing of M2-omni (Sec. 3.1 step balance, Sec. 3.2 dynamic adaptive balance)."""

from megatron_omni.balance.adaptive import AdaptiveBalancer
from megatron_omni.balance.step_balance import PlateauDetector, detect_plateau, loss_weights

__all__ = ["AdaptiveBalancer", "PlateauDetector", "detect_plateau", "loss_weights"]
