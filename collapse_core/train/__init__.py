"""Post-training stages, LoRA or full fine-tuning: one training loop, the SFT/DPO objectives,
adapter and weight-update utilities.

- :mod:`.objectives`: chat formatting with prompt-masked labels, batching, ``sft_loss``,
  ``dpo_loss`` (Rafailov et al. 2023), ``sequence_logprob``.
- :mod:`.loop`: ``train_stage`` (PEFT LoRA or full fine-tuning + AdamW), ``TrainConfig``,
  ``TrainHooks`` (the extension point for interventions), ``TrainResult``.
- :mod:`.lora`: ``save_adapter``, ``merge_and_unload``, ``lora_deltas``, ``delta_weight``.
- :mod:`.full`: full fine-tuning's frozen copy of the starting weights and its ΔW.
- :mod:`.lora_metrics`: spectra and cross-stage subspace geometry of the updates ΔW (both
  methods).
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
