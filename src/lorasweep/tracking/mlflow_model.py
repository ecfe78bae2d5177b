"""A finished run logged as an MLflow model (artifact `model`): a pyfunc that predicts what
predict.py predicts, which `mlflow.pyfunc.load_model`, `mlflow models serve` and the model
registry take as they are.

The model holds the run's inference files (adapter/ or model/, tokenizer/, label map, config,
serializer settings, blend/) as its artifact "run", lorasweep's code (its `code/`, first on the
path when it loads), a signature (the training columns in; pred_label, pred_score and
top<i>_label / top<i>_score out), an input example (a few validation rows) and its pip
requirements. The pyfunc itself is lorasweep/runs/served.py, logged as a file ("models from
code": no pickle), so this module names it by path and never imports it. A LoRA run's model holds
the adapter, not the base weights: it loads the base model the way the run did (a hub name, or a
local path the serving machine must also have).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from typing import Any

import lorasweep
from lorasweep import outputs
from lorasweep.config import PredictConfig

MODEL_ARTIFACT = "model"  # runs:/<run id>/model
RUN_ARTIFACT = "run"  # the run's inference files, inside the model
PACKAGE_DIR = os.path.dirname(os.path.abspath(lorasweep.__file__))
SERVED_MODEL_CODE = os.path.join(PACKAGE_DIR, "runs", "served.py")
# What predicting needs, and the record that says the run finished writing it.
RUN_FILES = (*outputs.INFERENCE_FILES, outputs.COMPLETE)
# lorasweep's dependencies that only training and sweeps import: not installed to serve.
TRAINING_ONLY = frozenset({"deepspeed", "hydra-optuna-sweeper", "hydra-joblib-launcher",
                           "hydra-submitit-launcher", "submitit", "optuna", "matplotlib",
                           "psutil"})


def stage_run_files(run_dir: str, target: str) -> str:
    """Copy what predicting needs from `run_dir` to `target`; `target`."""
    os.makedirs(target)
    ignore = shutil.ignore_patterns(*outputs.NOT_FOR_INFERENCE)
    for name in RUN_FILES:
        source = os.path.join(run_dir, name)
        if os.path.isdir(source):
            shutil.copytree(source, os.path.join(target, name), ignore=ignore)
        elif os.path.isfile(source):
            shutil.copy(source, os.path.join(target, name))
    return target


def pip_requirements() -> list[str]:
    """lorasweep's dependencies at the versions installed here (where the run trained), less
    the training-only ones."""
    from importlib.metadata import PackageNotFoundError, requires, version

    pinned = []
    for line in requires("lorasweep") or []:
        if ";" in line:
            continue  # an extra's (dev tools)
        name = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line).group(0)
        if name in TRAINING_ONLY:
            continue
        try:
            # The public version: torch 2.13.0, not 2.13.0+cpu (the serving machine's own build)
            pinned.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            pinned.append(line)
    return pinned


def model_signature(example, num_labels: int, top_k: int):
    """The training columns in, with the types of the example's; the prediction columns out.
    Integer columns are declared double: a JSON null turns an integer column into floats, which
    the model must take, since predict.py skips a missing value (or writes data.null_token);
    a float prints as the same text as the integer it holds (data/serialization.format_value)."""
    from mlflow.models import infer_signature
    from mlflow.models.signature import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema

    inferred = infer_signature(example).inputs
    inputs = Schema([ColSpec(DataType.double if spec.type in (DataType.long, DataType.integer)
                             else spec.type, spec.name) for spec in inferred.inputs])
    columns = [ColSpec(DataType.string, "pred_label"), ColSpec(DataType.double, "pred_score")]
    for i in range(1, min(top_k, num_labels) + 1):
        columns += [ColSpec(DataType.string, f"top{i}_label"),
                    ColSpec(DataType.double, f"top{i}_score")]
    return ModelSignature(inputs=inputs, outputs=Schema(columns))


def log_run_model(mlflow, run_dir: str, example, num_labels: int,
                  registered_model_name: str | None) -> Any:
    """Log the run in `run_dir` as the active MLflow run's model; register a new version under
    `registered_model_name` when given. `example`: a few rows of the training columns."""
    top_k = PredictConfig.top_k
    with tempfile.TemporaryDirectory() as tmp:
        staged = stage_run_files(run_dir, os.path.join(tmp, RUN_ARTIFACT))
        return mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT, python_model=SERVED_MODEL_CODE,
            artifacts={RUN_ARTIFACT: staged}, code_paths=[PACKAGE_DIR],
            signature=model_signature(example, num_labels, top_k), input_example=example,
            pip_requirements=pip_requirements(), registered_model_name=registered_model_name)
