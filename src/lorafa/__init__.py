"""lorafa: memory-true LoRA-FA fine-tuning for Hugging Face models."""

__version__ = "0.1.0"
