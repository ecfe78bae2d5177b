"""The names of the metrics a run produces: what `objective.metric` may name.

Apart from metrics.py so that a config is checked without importing `evaluate` and scikit-learn
(the check runs before the training stack is imported: an error in about 3 s, not 10).
"""

from __future__ import annotations

from typing import List, Sequence

METRIC_NAMES = ("accuracy", "f1_macro", "f1_weighted", "precision_macro", "recall_macro")
# What the Trainer adds for an evaluated split, beside the metrics above.
TRAINER_SPLIT_METRICS = ("loss", "runtime", "samples_per_second", "steps_per_second")
# Scored models per split: the fine-tuned one, the TF-IDF baseline, the probe head, the blend of
# the model with the baseline.
SCORED_VARIANTS = ("", "baseline_", "probe_", "blend_")
HIERARCHY_METRIC_NAMES = ("accuracy", "f1_macro")  # per prefix, from hierarchy_metrics


def run_metric_names(hierarchy_prefixes: Sequence[int]) -> List[str]:
    """Every eval_/test_ metric a run with these settings can produce (what objective.metric
    may name). Names that never appear in metrics.json would only fail after training."""
    names = [f"{split}_{variant}{name}" for split in ("eval", "test")
             for variant in SCORED_VARIANTS for name in METRIC_NAMES + TRAINER_SPLIT_METRICS]
    names += [f"test_prefix{p}_{name}" for p in hierarchy_prefixes
              for name in HIERARCHY_METRIC_NAMES]
    return names + ["train_loss"]
