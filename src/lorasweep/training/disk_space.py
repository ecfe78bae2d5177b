"""Will the run fit on its disk? What a run writes from the start of training on, estimated from
its model and settings, against the free space of the run dir's filesystem: one warning line
when it is short, before the hours of training that would end in "no space left on device".

The data cache is left out: it is written (or found) before the model is built, and a full disk
there already ends the run with one line.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from lorasweep import distributed, outputs
from lorasweep.model.modeling import DTYPES, count_parameters

log = logging.getLogger(__name__)

def expected_writes(cfg, model, tokenizer, data, ds_config: dict | None) -> dict[str, Any]:
    """Bytes the run will hold on disk at its peak: the checkpoints kept at once, the saved
    adapter (or full model) with its copy of the tokenizer, tokenizer/, the blend, the reports.
    `model`: after LoRA wraps it."""
    params = count_parameters(model)
    trainable, total = params["trainable"], params["total"]
    # The Trainer saves the tokenizer with the model, in the adapter dir and every checkpoint.
    vocab = tokenizer_bytes(tokenizer)
    weight_bytes = DTYPES[cfg.model.dtype].itemsize
    saved = (trainable * 4 if cfg.lora.enable else total * weight_bytes) + vocab
    # A checkpoint: the saved weights and the Adam moments of the trainable ones (fp32); under
    # DeepSpeed also its fp32 master copy and the module's whole state dict.
    checkpoint = saved + trainable * 8
    if ds_config is not None:
        checkpoint += trainable * 4 + total * weight_bytes
    reports = sum(data.raw[split].data.nbytes for split in ("validation", "test")) * 2
    kept = checkpoints_kept(cfg.training, len(data.tokenized["train"]), distributed.world_size())
    blend = (blend_bytes(data.raw["train"].data.nbytes, len(data.label_map.labels))
             if cfg.baseline == "tfidf" and cfg.blend else 0)
    return {"checkpoint": checkpoint, "checkpoints": kept, "model": saved, "reports": reports,
            "blend": blend, "total": checkpoint * kept + saved + vocab + reports + blend}


def blend_bytes(train_bytes: int, num_labels: int) -> int:
    """The TF-IDF model's coefficients (classes x n-gram features x 4 bytes), with about one
    feature per 16 bytes of training rows (the sample ledger: 22k from 395 kB); a run does not
    blend above MAX_BLEND_BYTES."""
    from lorasweep.evaluation.blend import MAX_BLEND_BYTES

    return min(num_labels * 4 * train_bytes // 16, MAX_BLEND_BYTES)


def tokenizer_bytes(tokenizer) -> int:
    """About what the tokenizer's files take (tokenizer.json holds nearly all of it)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return len(backend.to_str().encode())
    return 16 * len(tokenizer)


def checkpoints_kept(training, train_rows: int, world_size: int = 1) -> int:
    """The most checkpoints on disk at once: save_total_limit, one more while a new one is
    written before the oldest goes, one more for the best epoch (load_best_model_at_end);
    save_total_limit=null keeps every one the run saves."""
    if training.save_strategy == "no":
        return 0
    if training.save_total_limit is not None:
        return training.save_total_limit + 1 + int(bool(training.load_best_model_at_end))
    per_step = (training.per_device_train_batch_size * world_size
                * training.gradient_accumulation_steps)
    steps = (training.max_steps if training.max_steps > 0
             else math.ceil(training.num_train_epochs * math.ceil(train_rows / per_step)))
    if training.save_strategy == "steps":
        return max(1, steps // training.save_steps)
    return max(1, math.ceil(training.num_train_epochs))


def warn_if_short(cfg, model, tokenizer, data, ds_config: dict | None) -> dict[str, Any]:
    """Log one warning when the run dir's filesystem has less free space than the run will
    write; the estimate."""
    needs = expected_writes(cfg, model, tokenizer, data, ds_config)
    free = outputs.free_bytes(cfg.output_dir)
    if free < needs["total"]:
        log.warning("%s has %s free, and this run writes about %s (%d checkpoint(s) of %s, the "
                    "%s %s, blend %s, reports %s): free space, or lower "
                    "training.save_total_limit", cfg.output_dir, megabytes(free),
                    megabytes(needs["total"]), needs["checkpoints"], megabytes(needs["checkpoint"]),
                    "adapter" if cfg.lora.enable else "model", megabytes(needs["model"]),
                    megabytes(needs["blend"]), megabytes(needs["reports"]))
    return needs


def megabytes(n: int) -> str:
    return f"{n / 2**20:.1f} MB"
