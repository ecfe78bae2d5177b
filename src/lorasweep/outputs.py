"""The layout of a run dir, and writing files so that a reader never sees half of one.

    <run_dir>/adapter/  (or model/ with lora=none)   tokenizer/   label_map.json   blend/
             model_metadata.json  dataset_metadata.json  metrics.json  config.yaml  reports
             run_complete.json  .hydra/  checkpoints/checkpoint-<step>/

A run is finished when run_complete.json is there: written last, it lists every output file with
its size and sha256. A rerun removes it before it writes its first output, so a run that dies
while writing them leaves a dir that every reader refuses (`unfinished_reason`), and its
checkpoints stay for `resume=auto`. `lorasweep.runs.load` reads a finished run back.

A failed write names its path: `writing(path)` turns an OS error (a full disk above all) into one
line, `WriteError`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lorasweep.errors import UserError
from lorasweep.redaction import masked_container

ADAPTER_DIR = "adapter"
FULL_MODEL_DIR = "model"
TOKENIZER_DIR = "tokenizer"
BLEND_DIR = "blend"  # the TF-IDF model and the blend weight (lorasweep.evaluation.blend)
CHECKPOINT_DIR = "checkpoints"
LABEL_MAP = "label_map.json"
METRICS = "metrics.json"
MODEL_METADATA = "model_metadata.json"
DATASET_METADATA = "dataset_metadata.json"
RUN_CONFIG = "config.yaml"
PRUNED = "pruned.json"  # a sweep trial stopped by its pruner (lorasweep.training.pruning)
COMPLETE = "run_complete.json"  # written last: the run's output files, their sizes and sha256
# What predicting needs (predict, export, the MLflow model); training_args.bin, the Trainer's
# pickle, is not needed (see README, Secrets).
INFERENCE_FILES = (ADAPTER_DIR, FULL_MODEL_DIR, TOKENIZER_DIR, BLEND_DIR, LABEL_MAP, RUN_CONFIG,
                   DATASET_METADATA, MODEL_METADATA)
NOT_FOR_INFERENCE = ("training_args.bin",)
RUN_FORMAT = 2  # model_metadata.json's run_format: runs without it predate run_complete.json
RESUME_HINT = "rerun the same command to resume"  # what to do after a failed write
RERUN_HINT = "rerun the same command"


@contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """A temporary path beside `path` to write a file or a directory at; when the block ends
    without an error, it takes `path`'s place in one rename, so a reader sees the old version or
    the whole new one, never a part. On an error the temporary path is removed and `path` stays
    as it was. `path` may already be a file or an empty directory (rename replaces those); a
    non-empty directory makes the rename fail with OSError."""
    directory, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".{name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.isdir(tmp) and not os.path.islink(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.lexists(tmp):
            os.remove(tmp)


def write_json(run_dir: str, name: str, payload: Any) -> str:
    path = os.path.join(run_dir, name)
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        json.dump(payload, fh, indent=2, sort_keys=False, default=str)
        fh.write("\n")
    return path


def read_json(run_dir: str, name: str) -> Any:
    with open(os.path.join(run_dir, name)) as fh:
        return json.load(fh)


def save_run_config(run_dir: str, cfg: DictConfig) -> str:
    """The resolved config, which predict/export use to rebuild the model and the serializer.
    Secrets are masked; one given as `${oc.env:VAR}` stays that interpolation
    (lorasweep.redaction)."""
    path = os.path.join(run_dir, RUN_CONFIG)
    with atomic_path(path) as tmp:
        OmegaConf.save(OmegaConf.create(masked_container(cfg, cfg.tracking.secret_keys)), tmp)
    return path


def disk_full(exc: BaseException | None) -> bool:
    """Whether `exc` (or an error it wraps) is a full disk or quota. torch, safetensors and
    pyarrow each word it their own way."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(exc) for text in ("No space left on device", "StorageFull",
                                              "Disk quota exceeded")):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def torch_write_failed(exc: BaseException) -> bool:
    """torch.save's own words for a write that failed, a full disk among the causes: it says
    nothing of space ("file write failed", "unexpected pos N vs M")."""
    return isinstance(exc, RuntimeError) and any(
        text in str(exc) for text in ("PytorchStreamWriter", "inline_container", "write failed"))


def free_bytes(path: str) -> int:
    """Free space on the filesystem that holds `path` (or would: its nearest existing parent)."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free


class WriteError(UserError):
    """A write the machine refused: a full disk, a read-only filesystem, no permission."""


@contextmanager
def writing(path: str, hint: str = RESUME_HINT) -> Iterator[None]:
    """Turn a failed write under `path` into one line that names it, the free space and what to
    do (`hint`: after freeing space or fixing the path)."""
    try:
        yield
    except WriteError:
        raise
    except Exception as exc:
        free = free_bytes(path)
        if disk_full(exc) or (free < 2**16 and torch_write_failed(exc)):
            raise WriteError(f"no space left on device writing {path} ({free / 2**20:.1f} MB "
                             f"free): free space and {hint}") from None
        if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS,
                                                      errno.EIO):
            raise WriteError(f"cannot write {path}: {exc.strerror}: make it writable and "
                             f"{hint}") from None
        raise


def output_files(run_dir: str) -> dict[str, dict[str, Any]]:
    """The run's output files (not its checkpoints, Hydra's files, logs or temp files), by path
    relative to `run_dir`: their size and sha256."""
    found = {}
    for root, dirs, files in os.walk(run_dir):
        rel_root = os.path.relpath(root, run_dir)
        if rel_root == ".":
            dirs[:] = [d for d in dirs if d not in (CHECKPOINT_DIR, ".hydra")]
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if name.startswith(".") or name.endswith(".log") or (rel_root == "." and name in (
                    COMPLETE, PRUNED)):
                continue
            path = os.path.join(root, name)
            with open(path, "rb") as fh:
                digest = hashlib.file_digest(fh, "sha256").hexdigest()
            found[os.path.normpath(os.path.join(rel_root, name))] = {
                "bytes": os.path.getsize(path), "sha256": digest}
    return dict(sorted(found.items()))


def mark_unfinished(run_dir: str) -> None:
    """Before a run writes its first output into `run_dir` (a rerun: over a finished run's)."""
    path = os.path.join(run_dir, COMPLETE)
    if os.path.lexists(path):
        os.remove(path)


def mark_finished(run_dir: str) -> str:
    """The last write of a run: the record that says every output is on disk."""
    with writing(os.path.join(run_dir, COMPLETE)):
        return write_json(run_dir, COMPLETE, {"finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                              "files": output_files(run_dir)})


def unfinished_reason(run_dir: str, needed: tuple[str, ...] = INFERENCE_FILES) -> str | None:
    """Why `run_dir` is not a finished run (None: it is). Only the files under `needed` are
    checked against the record, by size: a copy of the inference files (the MLflow model) is
    finished too."""
    record_path = os.path.join(run_dir, COMPLETE)
    if not os.path.isfile(record_path):
        if _predates_records(run_dir):
            return None
        if not any(os.path.isdir(os.path.join(run_dir, n)) for n in (ADAPTER_DIR,
                                                                      FULL_MODEL_DIR)):
            return (f"no {COMPLETE} and no {ADAPTER_DIR}/ or {FULL_MODEL_DIR}/: it stopped "
                    "before saving its model")
        return f"no {COMPLETE}: it stopped while writing its outputs"
    try:
        files = read_json(run_dir, COMPLETE)["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{COMPLETE} is unreadable ({exc})"
    problems = []
    for rel, entry in files.items():
        top = rel.split(os.sep)[0]
        if top not in needed or os.path.basename(rel) in NOT_FOR_INFERENCE:
            continue
        path = os.path.join(run_dir, rel)
        if not os.path.isfile(path):
            problems.append(f"{rel} is missing")
        elif os.path.getsize(path) != entry["bytes"]:
            problems.append(f"{rel} has {os.path.getsize(path)} bytes, not {entry['bytes']}")
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more"
                                           if len(problems) > 3 else "")
        return f"its files differ from {COMPLETE}: {shown}"
    return None


def _predates_records(run_dir: str) -> bool:
    """A run finished by a lorasweep without completion records: its model_metadata.json (written
    after the model, blend and metrics) is there, without run_format."""
    try:
        return "run_format" not in read_json(run_dir, MODEL_METADATA)
    except (OSError, ValueError):
        return False
