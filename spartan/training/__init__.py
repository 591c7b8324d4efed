"""Training: ``train`` (the Accelerate loop, ``loop.py``), its settings and result (``config.py``),
its run folder of resume state, best weights and log (``run_folder.py``), the one interface
through which it saves and loads a model's trainable state (``weights.py``), and the sharding of
the trainable modules across processes with FSDP2 (``sharding.py``)."""

from .config import TrainingConfig, TrainResult
from .loop import ComputeMetrics, padding_collator, train

__all__ = ["ComputeMetrics", "TrainResult", "TrainingConfig", "padding_collator", "train"]
