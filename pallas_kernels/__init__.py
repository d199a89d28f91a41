"""ditjax's own Pallas kernels: flash attention for TPU (Mosaic TPU) and Hopper GPUs (Mosaic GPU),
plus the HASTE attention-map helpers."""
from pallas_kernels.common import BlockSizes, supports
from pallas_kernels.flash import flash_attention, flash_attention_with_lse
from pallas_kernels.haste import attention_ce_loss, attention_log_probs, attention_logits

__all__ = ["BlockSizes", "attention_ce_loss", "attention_log_probs", "attention_logits", "flash_attention",
           "flash_attention_with_lse", "supports"]
