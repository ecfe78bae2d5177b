"""Predict labels for a table with a trained run: the run's model, tokenizer, labels and serializer.

    python src/lorasweep/predict.py run_dir=multirun/runs/X input=rows.csv output=preds.parquet
    python src/lorasweep/predict.py run_dir=... input=rows.parquet output=preds.jsonl top_k=5

Each output row is its input row plus pred_label, pred_score and top1_label, top1_score, ...
Input rows are serialized with the same function and settings as the run's training rows.
A run that saved a blend (blend/: the model with its TF-IDF baseline) predicts with the blend;
blend=false gives the fine-tuned model alone.
"""

import os
import sys

if __package__ in (None, ""):
    # Run as a script: make `lorasweep` importable, keep this dir off sys.path (see train.py).
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from dataclasses import dataclass  # noqa: E402
from typing import Any, Dict, List, Optional  # noqa: E402

import hydra  # noqa: E402
from hydra.core.config_store import ConfigStore  # noqa: E402
from omegaconf import MISSING, DictConfig  # noqa: E402

from lorasweep import runs  # noqa: E402
from lorasweep.config import CONF_DIR  # noqa: E402
from lorasweep.errors import ConfigError, DataError, exit_2_on_user_error, run_cli  # noqa: E402

WRITERS = (".parquet", ".csv", ".jsonl")


@dataclass
class PredictConfig:
    run_dir: str = MISSING
    input: str = MISSING
    output: str = MISSING
    top_k: int = 3  # top1_label/top1_score ... topK_label/topK_score columns
    batch_size: int = 64  # rows per forward pass (batched by token length, output in input order)
    max_length: Optional[int] = None  # None: the run's data.max_length
    device: str = "auto"  # auto: cuda when available; or cpu, cuda
    progress: bool = True
    blend: bool = True  # the run's blend with its TF-IDF baseline, when it saved one


ConfigStore.instance().store(name="base_predict", node=PredictConfig)


def validate_request(cfg) -> None:
    """Fail on bad settings before the (slow) model load, and before any output is written."""
    ext = os.path.splitext(cfg.output)[1].lower()
    if ext not in WRITERS:
        raise ConfigError(f"output={cfg.output}: unsupported extension '{ext}' "
                          f"(expected one of {', '.join(WRITERS)})")
    for key in ("top_k", "batch_size"):
        if cfg[key] < 1:
            raise ConfigError(f"{key}={cfg[key]}: expected a positive integer")
    runs.check_run_dir(cfg.run_dir)


def check_input_columns(columns: List[str], settings: Dict[str, Any], path: str) -> None:
    missing = [c for c in settings["text_columns"] if c not in columns]
    if missing:
        raise DataError(f"input={path}: missing column(s) used in training: {', '.join(missing)} "
                        f"(columns: {', '.join(columns)})")


def top_k_frame(probabilities, labels: List[str], top_k: int):
    """pred_label / pred_score and top<i>_label / top<i>_score columns, one row per input row."""
    import numpy as np
    import pandas as pd

    k = min(top_k, probabilities.shape[1])
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    names = np.asarray(labels, dtype=object)
    columns = {"pred_label": names[order[:, 0]],
               "pred_score": np.take_along_axis(probabilities, order[:, :1], axis=1)[:, 0]}
    for i in range(k):
        columns[f"top{i + 1}_label"] = names[order[:, i]]
        columns[f"top{i + 1}_score"] = np.take_along_axis(probabilities, order[:, i:i + 1],
                                                          axis=1)[:, 0]
    return pd.DataFrame(columns)


def predict_table(model, tokenizer, labels: List[str], settings: Dict[str, Any], table,
                  max_length: int, batch_size: int = 64, top_k: int = 3, progress: bool = False,
                  blend=None):
    """The input rows (a `datasets.Dataset`) as a DataFrame, plus the prediction columns.
    `blend`: a `SavedBlend` to combine the model's probabilities with, or None."""
    import pandas as pd

    from lorasweep.serialization import serialize_batch
    from lorasweep.inference import predict_probabilities

    texts = serialize_batch(table.to_dict(), settings)
    probabilities = predict_probabilities(model, tokenizer, texts, max_length, batch_size,
                                          progress=progress)
    if blend is not None:
        probabilities = blend.apply(texts, probabilities)
    frame = table.to_pandas()
    predictions = top_k_frame(probabilities, labels, top_k)
    # Prediction columns replace same-named input columns (e.g. re-scoring a predictions file).
    frame = frame.drop(columns=[c for c in predictions.columns if c in frame.columns])
    return pd.concat([frame.reset_index(drop=True), predictions], axis=1)


def label_metrics(frame, label_column: str, labels: List[str]) -> Optional[Dict[str, float]]:
    """Accuracy and macro-F1 against the input's label column, when it has one."""
    from lorasweep.labels import label_to_text
    from lorasweep.metrics import classification_metrics

    if label_column not in frame.columns:
        return None
    label2id = {name: i for i, name in enumerate(labels)}
    pairs = [(label_to_text(t), p) for t, p in zip(frame[label_column], frame["pred_label"])
             if t is not None and str(t).strip() and str(t) != "nan"]
    if not pairs:
        return None
    # A label the run never saw gets id -1: always wrong, and a class of its own in macro-F1.
    references = [label2id.get(t, -1) for t, _ in pairs]
    predictions = [label2id[p] for _, p in pairs]
    result = classification_metrics(predictions, references)
    return {"rows": len(pairs), "unknown_labels": sum(r < 0 for r in references),
            "accuracy": result["accuracy"], "f1_macro": result["f1_macro"]}


def write_table(frame, path: str) -> None:
    """Write by extension through a temp file + rename: a failed run leaves no partial output."""
    ext = os.path.splitext(path)[1].lower()
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        if ext == ".parquet":
            frame.to_parquet(tmp, index=False)
        elif ext == ".csv":
            frame.to_csv(tmp, index=False)
        else:
            frame.to_json(tmp, orient="records", lines=True, force_ascii=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def pick_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda: no CUDA device available")
    return torch.device(name)


def predict_file(cfg) -> Dict[str, Any]:
    """Read `cfg.input`, predict with the run in `cfg.run_dir`, write `cfg.output`; a summary."""
    from lorasweep.blend import SavedBlend
    from lorasweep.tables import read_table

    validate_request(cfg)
    from lorasweep.preflight import check_max_length

    table = read_table(cfg.input, "input")
    # Check the columns and max_length before the (slow) model load.
    run_cfg = runs.load_run_config(cfg.run_dir)
    settings = runs.run_serialization(cfg.run_dir, run_cfg)
    check_input_columns(table.column_names, settings, cfg.input)
    if cfg.max_length is not None:
        check_max_length(cfg.max_length, run_cfg.model, "max_length")
    model, tokenizer, label_map, run_cfg = runs.load_for_inference(cfg.run_dir)
    model.to(pick_device(cfg.device))
    max_length = cfg.max_length or run_cfg.data.max_length
    blend = None
    if cfg.blend and SavedBlend.exists(cfg.run_dir):
        blend = SavedBlend(cfg.run_dir)
    frame = predict_table(model, tokenizer, label_map.labels, settings, table, max_length,
                          cfg.batch_size, cfg.top_k, cfg.progress, blend)
    write_table(frame, cfg.output)
    return {"rows": len(frame), "output": os.path.abspath(cfg.output),
            "blend_weight": blend.weight if blend is not None else None,
            "metrics": label_metrics(frame, run_cfg.data.label_column, label_map.labels),
            "label_column": run_cfg.data.label_column}


def format_summary(summary: Dict[str, Any]) -> str:
    lines = [f"lorasweep: wrote {summary['rows']} predictions to {summary['output']}"]
    if summary.get("blend_weight") is not None:
        lines.append(f"  the model blended with the run's TF-IDF baseline (model weight "
                     f"{summary['blend_weight']:.1f}); blend=false: the model alone")
    metrics = summary["metrics"]
    if metrics:
        unknown = (f", {metrics['unknown_labels']} with labels the run never saw"
                   if metrics["unknown_labels"] else "")
        lines.append(f"  against column {summary['label_column']!r} ({metrics['rows']} rows"
                     f"{unknown}): accuracy {metrics['accuracy']:.4f}, "
                     f"macro-F1 {metrics['f1_macro']:.4f}")
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="predict")
def main(cfg: DictConfig) -> Dict[str, Any]:
    summary = exit_2_on_user_error(predict_file, cfg)
    print(format_summary(summary), flush=True)
    return summary


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()
