"""LoRA post-training stages: one training loop, the SFT/DPO objectives, adapter utilities.

- :mod:`.objectives`: chat formatting with prompt-masked labels, batching, ``sft_loss``,
  ``dpo_loss`` (Rafailov et al. 2023), ``sequence_logprob``.
- :mod:`.loop`: ``train_stage`` (PEFT LoRA + AdamW), ``TrainConfig``, ``TrainHooks`` (the
  extension point for interventions), ``TrainResult``.
- :mod:`.lora`: ``save_adapter``, ``merge_and_unload``, ``lora_deltas``, ``delta_weight``.
- :mod:`.lora_metrics`: spectra and cross-stage subspace geometry of the LoRA updates ΔW.
"""

from .loop import OBJECTIVES, TrainConfig, TrainHooks, TrainResult, train_stage
from .objectives import collate, dpo_loss, format_example, sequence_logprob, sft_loss

__all__ = [
    "OBJECTIVES",
    "TrainConfig",
    "TrainHooks",
    "TrainResult",
    "collate",
    "dpo_loss",
    "format_example",
    "sequence_logprob",
    "sft_loss",
    "train_stage",
]
