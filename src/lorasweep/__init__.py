"""lorasweep: Hydra-configured LoRA fine-tuning of sequence classifiers under DeepSpeed."""

__version__ = "0.1.0"
