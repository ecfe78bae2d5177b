"""lorasweep: Hydra-configured LoRA fine-tuning of sequence classifiers under DeepSpeed."""

__version__ = "0.1.0"  # the package's one version: pyproject.toml reads it from here
