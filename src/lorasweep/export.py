"""Export a run as a plain transformers model: LoRA merged into the base weights, no peft needed.

    lorasweep-export run_dir=multirun/runs/X output=exported/ledger-classifier
    (or python -m lorasweep.export ..., or python src/lorasweep/export.py ... in a clone)

    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    model = AutoModelForSequenceClassification.from_pretrained("exported/ledger-classifier")

The dir also holds lorasweep_serialization.json: the text columns, separator, etc. that turn a
table row into the model's input text (lorasweep.data.serialization.serialize_row), and the
max_length. The run's blend with its TF-IDF baseline (blend/) is not part of the export: a
transformers model cannot hold it. lorasweep-predict on the run dir applies it.
"""

import os
from dataclasses import dataclass
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from lorasweep import outputs
from lorasweep.cli.harness import exit_2_on_user_error, run_cli
from lorasweep.config import CONF_DIR, EXECUTION_WHITELIST
from lorasweep.errors import ConfigError, UserError
from lorasweep.runs import load as runs

SERIALIZATION_FILE = "lorasweep_serialization.json"


@dataclass
class ExportConfig:
    run_dir: str = MISSING
    output: str = MISSING


ConfigStore.instance().store(name="base_export", node=ExportConfig)


def check_output_dir(path: str) -> None:
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise ConfigError(f"output={path}: exists and is not an empty directory; "
                          "choose a new path or remove it")


def merged_model(model):
    """The adapter folded into the base weights; a full-fine-tuned model is returned as is."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        # Also swaps each modules_to_save wrapper (the classifier head) for its trained copy.
        model = model.merge_and_unload()
    return model


def check_plain_pooling(model, run_dir: str) -> None:
    """A head that reads the mean (or first token) of the tokens instead of the model's pooler
    is not what a transformers *ForSequenceClassification class computes: an export would load
    and predict differently. Refused, before anything is written."""
    from lorasweep.model.pooling import model_pooling

    pooling = model_pooling(model)
    if pooling != "pooler":
        raise UserError(f"run_dir={run_dir}: the run's head reads the {pooling} pooling of the "
                        "tokens (model.pooling), which a plain transformers model cannot "
                        "express; predict with lorasweep-predict on the run dir, or train with "
                        "model.pooling=pooler to export")


def export_run(cfg) -> dict[str, Any]:
    """Write the merged model, tokenizer and serializer settings to `cfg.output`; a summary."""
    run_dir, output = cfg.run_dir, cfg.output
    check_output_dir(output)
    model, tokenizer, label_map, cfg = runs.load_for_inference(run_dir)
    check_plain_pooling(model, run_dir)
    model = merged_model(model)
    model.config.id2label = label_map.id2label
    model.config.label2id = label_map.label2id
    serialization = {**runs.run_serialization(run_dir, cfg), "max_length": cfg.data.max_length,
                     "label_column": cfg.data.label_column}
    # Built beside it and renamed into place (over an empty dir): never a half-written export.
    with (outputs.writing(output, outputs.RERUN_HINT),
          outputs.atomic_path(output.rstrip(os.sep)) as tmp):
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        outputs.write_json(tmp, SERIALIZATION_FILE, serialization)
    return {"output": os.path.abspath(output), "model_class": type(model).__name__,
            "num_labels": len(label_map.labels),
            "has_blend": os.path.isdir(os.path.join(run_dir, outputs.BLEND_DIR))}


@hydra.main(config_path=CONF_DIR, config_name="export", execution_whitelist=EXECUTION_WHITELIST)
def main(cfg: DictConfig) -> dict[str, Any]:
    summary = exit_2_on_user_error(export_run, cfg)
    print(f"lorasweep: exported {summary['model_class']} ({summary['num_labels']} labels) "
          f"to {summary['output']}", flush=True)
    if summary["has_blend"]:
        print("  the model alone: the run's blend with its TF-IDF baseline is not exported "
              "(lorasweep-predict on the run dir applies it)", flush=True)
    return summary


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()
