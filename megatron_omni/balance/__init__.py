"""Loss balancing of M2-omni (Sec. 3.1 step balance, Sec. 3.2 dynamic adaptive balance, Sec. 3.3 text share)."""

from megatron_omni.balance.adaptive import AdaptiveBalancer
from megatron_omni.balance.config import AdaptiveConfig, CalibrationConfig, SchedulerConfig
from megatron_omni.balance.scheduler import ModalityRoundScheduler, StepPlan
from megatron_omni.balance.step_balance import PlateauDetector, detect_plateau, loss_weights

__all__ = [
    "AdaptiveBalancer", "AdaptiveConfig", "CalibrationConfig", "ModalityRoundScheduler", "PlateauDetector",
    "SchedulerConfig", "StepPlan", "detect_plateau", "loss_weights",
]
