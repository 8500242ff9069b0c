"""lorafa: memory-true LoRA-FA fine-tuning for Hugging Face models.

The core idea lives in two files: `lorafa.autograd` (the linear function that keeps only u = A·dropout(x) for
backward) and `lorafa.layer` (the LoRAFALinear module that wraps a frozen base layer).
"""

from lorafa.adapter import load_adapter, read_adapter_config, save_adapter
from lorafa.autograd import lorafa_linear
from lorafa.config import LoRAFAConfig
from lorafa.gradient_init import init_a_from_gradients
from lorafa.inject import (
    add_lorafa,
    lorafa_layers,
    merge_lorafa,
    remove_lorafa,
    trainable_parameters,
    unmerge_lorafa,
)
from lorafa.layer import LoRAFALinear
from lorafa.loss import chunked_causal_lm_loss
from lorafa.offload import offload_activations
from lorafa.recompute import disable_cheap_recompute, enable_cheap_recompute

__version__ = "0.1.0"

__all__ = [
    "LoRAFAConfig",
    "LoRAFALinear",
    "add_lorafa",
    "chunked_causal_lm_loss",
    "disable_cheap_recompute",
    "enable_cheap_recompute",
    "init_a_from_gradients",
    "load_adapter",
    "lorafa_layers",
    "lorafa_linear",
    "merge_lorafa",
    "offload_activations",
    "read_adapter_config",
    "remove_lorafa",
    "save_adapter",
    "trainable_parameters",
    "unmerge_lorafa",
]
