"""What the tests share: the real config tree composed, the real CLI run in a subprocess, and the
checks several tests make on a finished run. (Fixtures are in conftest.py.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from lorasweep.config import CONF_DIR  # importing it registers the schemas, as train.py does

ROOT = Path(__file__).resolve().parents[1]
CONF = Path(CONF_DIR)  # the package's config tree: in a clone, the repository's conf/
TRAIN = ROOT / "src" / "lorasweep" / "train.py"
# baseline=none: a smoke run's scores mean nothing, and the TF-IDF fit would add seconds to each
# of the suite's many runs (tests that check the baseline turn it back on)
SMOKE = ["model=tiny_bert", "training=smoke", "tracking=none", "baseline=none"]
SAMPLE = ROOT / "data" / "sample_ledger" / "ledger.parquet"


SHM_OP = "deepspeed_shm_comm"  # the op DeepSpeed JIT-builds for CPU communication


def make_stale_lock(path: Path) -> None:
    """A lock file as torch's FileBaton leaves it when its build is killed: present, closed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    old = time.time() - 600
    os.utime(path, (old, old))


def extensions_dir_with_stale_lock(tmp_path: Path) -> Path:
    """A TORCH_EXTENSIONS_DIR as a killed DeepSpeed op build leaves it: the op's lock still
    there. It holds this machine's build of the op when there is one, so that a run need not
    compile it again (about 1 min)."""
    from torch.utils.cpp_extension import get_default_build_root

    extensions = tmp_path / "torch_extensions"
    built = next(Path(get_default_build_root()).glob(f"*/{SHM_OP}"), None)
    if built is not None:
        shutil.copytree(built, extensions / SHM_OP)
    make_stale_lock(extensions / SHM_OP / "lock")
    return extensions


def compose_cfg(overrides: Sequence[str] = (), output_dir: str | None = None) -> DictConfig:
    """The real config tree, composed as Hydra would (minus the hydra: node's runtime values)."""
    with initialize_config_dir(config_dir=str(CONF)):
        cfg = compose(config_name="train", overrides=list(overrides))
    if output_dir is not None:
        with open_dict(cfg):
            cfg.output_dir = str(output_dir)
    return cfg


def deepspeed_launcher(ranks: int) -> tuple[str, ...]:
    """`deepspeed` for `ranks` ranks on a free port: tests that run at once (pytest-xdist) would
    otherwise all take the launcher's default, 29500."""
    from lorasweep.distributed import free_port

    return ("deepspeed", "--num_gpus", str(ranks), "--master_port", str(free_port()))


def torchrun_launcher(ranks: int) -> tuple[str, ...]:
    """`torchrun` for `ranks` ranks on a free port (see `deepspeed_launcher`)."""
    from lorasweep.distributed import free_port

    return ("torchrun", "--nproc_per_node", str(ranks), "--master_port", str(free_port()))


def cli_env() -> dict:
    env = dict(os.environ)
    for name in ("HYDRA_FULL_ERROR", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                 "MASTER_PORT", "MLFLOW_RUN_ID"):
        env.pop(name, None)  # a test process must not pass its own rank or run to the CLI
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    if "PYTEST_XDIST_WORKER" in os.environ:
        # Tests run two at a time (make test): one thread per process, so that a 2-rank run and
        # the other worker's run share the cores instead of spinning on them (OpenMP threads wait
        # by spinning; oversubscribed, a 2-rank test ran 3-4x slower).
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_train(args: list[str], launcher: Sequence[str] = (sys.executable,), timeout: int = 600,
              check: bool = False, entry: Sequence[str] = (str(TRAIN),)
              ) -> subprocess.CompletedProcess:
    """Run `<launcher> src/lorasweep/train.py <args>` from the repo root (`entry`: what the
    launcher runs, e.g. `("--module", "lorasweep.train")` instead of the file)."""
    cmd = [*launcher, *entry, *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=cli_env(), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}"
                             f"\n{proc.stderr[-6000:]}")
    return proc


def assert_reload_reproduces_predictions(run_dir: Path) -> None:
    """The saved adapter + tokenizer + label map, reloaded with PEFT, give the predictions the
    training process wrote for the validation split (reports/predictions_validation.csv).

    The rows go through the reloaded model in the batches the run's evaluation used (sorted by
    length, training.per_device_eval_batch_size rows, padded to the longest) and in the precision
    the run computed in: a row's scores depend on its padding and on bf16 rounding, which a steep
    head (the tiny test models' probe) magnifies past any tight tolerance."""
    from lorasweep.runs.inference import predict_probabilities
    from lorasweep.runs.load import load_for_inference

    model, tokenizer, label_map, cfg = load_for_inference(str(run_dir))
    saved = pd.read_csv(run_dir / "reports" / "predictions_validation.csv",
                        dtype={"label": str, "pred_label": str})
    precision = run_precision(run_dir)
    probs = predict_probabilities(model, tokenizer, saved["text"].tolist(), cfg.data.max_length,
                                  cfg.training.per_device_eval_batch_size, precision=precision)
    assert [label_map.labels[i] for i in probs.argmax(-1)] == saved["pred_label"].tolist()
    np.testing.assert_allclose(probs.max(-1), saved["pred_score"], rtol=1e-4, atol=1e-5)


def run_precision(run_dir: Path):
    """The precision the run computed in, as its model_metadata.json records it."""
    from lorasweep.model.precision import Precision

    metadata = json.loads((run_dir / "model_metadata.json").read_text())
    return Precision(metadata["precision"], metadata["precision_reason"])


def assert_saved_blend_reproduces_the_run(run_dir: Path) -> None:
    """The run's blend/ applied to the reloaded model's validation probabilities scores exactly
    the eval_blend_f1_macro the run reported; predict applies it by default, and blend=false
    gives the model alone."""
    from omegaconf import OmegaConf

    from lorasweep.data.serialization import serialize_batch
    from lorasweep.evaluation.blend import SavedBlend
    from lorasweep.evaluation.metrics import classification_metrics
    from lorasweep.model.precision import resolve
    from lorasweep.predict import PredictConfig, format_summary, predict_file
    from lorasweep.runs.inference import predict_probabilities
    from lorasweep.runs.load import load_for_inference, run_serialization

    metrics = json.loads((run_dir / "metrics.json").read_text())
    model, tokenizer, label_map, cfg = load_for_inference(str(run_dir))
    saved = pd.read_csv(run_dir / "reports" / "predictions_validation.csv", dtype={"label": str})
    blend = SavedBlend(str(run_dir))
    assert blend.weight == metrics["blend_weight"]
    texts = saved["text"].tolist()
    blended = blend.apply(texts, predict_probabilities(
        model, tokenizer, texts, cfg.data.max_length, cfg.training.per_device_eval_batch_size,
        precision=run_precision(run_dir)))
    truth = [label_map.label2id[label] for label in saved["label"]]
    scored = classification_metrics(blended.argmax(1), truth)
    assert scored["f1_macro"] == pytest.approx(metrics["eval_blend_f1_macro"])

    rows = pd.read_parquet(SAMPLE).head(30)
    rows.to_parquet(run_dir.parent / "rows.parquet", index=False)
    texts = serialize_batch(rows.to_dict(orient="list"), run_serialization(str(run_dir), cfg))
    # predict's rule: the run's setting on predict's device (no DeepSpeed there)
    alone = predict_probabilities(model, tokenizer, texts, cfg.data.max_length,
                                  precision=resolve(cfg.training.mixed_precision, "cpu"))
    for use_blend, expected in ((True, blend.apply(texts, alone)), (False, alone)):
        out = run_dir.parent / f"predicted-{use_blend}.parquet"
        request = OmegaConf.merge(OmegaConf.structured(PredictConfig), {
            "run_dir": str(run_dir), "input": str(run_dir.parent / "rows.parquet"),
            "output": str(out), "progress": False, **({} if use_blend else {"blend": False})})
        summary = predict_file(request)  # the predict CLI's work, in this process
        assert summary["blend_weight"] == (blend.weight if use_blend else None)
        assert ("blended with the run's TF-IDF" in format_summary(summary)) == use_blend
        np.testing.assert_allclose(pd.read_parquet(out)["pred_score"], expected.max(1),
                                   atol=1e-6)


def tiny_trainer(tmp_path, overrides: Sequence[str] = (), rows: int = 16):
    """lorasweep's Trainer (the real config, TrainingArguments and Trainer builders) around a
    random one-layer BERT, in this process, with the same `rows` rows of varied length (row i
    has i % 7 extra words) as train and validation split: 2 steps of 4 rows."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from lorasweep.training.trainer import build_trainer, build_training_arguments

    cfg = compose_cfg([*SMOKE, "training.max_steps=2", "training.per_device_train_batch_size=4",
                       *overrides], output_dir=str(tmp_path))
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer_name_or_path)
    encoded = tokenizer([f"row {i} " + "word " * (i % 7) for i in range(rows)])
    split = datasets.Dataset.from_dict({**encoded, "labels": [i % 3 for i in range(rows)]})
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=32, num_labels=3))
    args = build_training_arguments(cfg.training, str(tmp_path), 0, None)
    return build_trainer(model, args, {"train": split, "validation": split}, tokenizer, None, [])


def save_tokenized_dataset_dict(path, tokenizer, rows=300, max_token=None):
    """A tokenized export: a DatasetDict with input_ids / attention_mask and a ClassLabel label."""
    table = pd.read_parquet(SAMPLE).head(rows)
    names = sorted(set(table["acct_code"]))
    encoded = tokenizer((table["vendor"] + " " + table["description"]).tolist(), truncation=True,
                        max_length=32)
    ids = encoded["input_ids"] if max_token is None else [x[:-1] + [max_token]
                                                          for x in encoded["input_ids"]]
    features = datasets.Features({
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "attention_mask": datasets.Sequence(datasets.Value("int8")),
        "label": datasets.ClassLabel(names=names)})
    full = datasets.Dataset.from_dict(
        {"input_ids": ids, "attention_mask": encoded["attention_mask"],
         "label": [names.index(c) for c in table["acct_code"]]}, features=features)
    cut = (rows * 2 // 3, rows * 5 // 6)
    datasets.DatasetDict({"train": full.select(range(cut[0])),
                          "validation": full.select(range(cut[0], cut[1])),
                          "test": full.select(range(cut[1], rows))}).save_to_disk(str(path))
    return full, names
