"""The prepared-data cache: `PreparedData` (what a run trains on), its key, and writing and reading
an entry.

A prepared result (splits, label map, tokenization, diagnostics) is stored under
`<data.cache_dir>/prepared/<key>`. The key hashes the bytes of the input files, every data setting
that changes the result, the tokenizer and the version of `datasets` that writes the entry (an
older one cannot always read a newer one's features), so an edited file, a new setting or another
`datasets` is a miss and a moved file is still a hit. Entries are written whole or not at all.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

import datasets

from lorasweep.console import no_progress_bars
from lorasweep.data.labels import LabelMap
from lorasweep.data.serialization import serialize_batch
from lorasweep.data.tables import expand_files
from lorasweep.errors import DataError, one_line
from lorasweep.outputs import RERUN_HINT, WriteError, atomic_path, writing


@dataclass
class PreparedData:
    raw: datasets.DatasetDict  # the split rows, label column as class names
    tokenized: datasets.DatasetDict  # input_ids, attention_mask, (token_type_ids), labels
    label_map: LabelMap
    serialization: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)

    def texts(self, split: str) -> list[str]:
        """The serialized text of every row of a split, as the model saw it (untruncated)."""
        return serialize_batch(self.raw[split].to_dict(), self.serialization)


# Data settings that change nothing in the prepared result; the paths are replaced by the hash of
# the files' bytes (a moved file is still a hit, an edited one is a miss).
NOT_IN_KEY = ("cache_dir", "num_proc", "train_path", "valid_path", "test_path")
CACHE_VERSION = 4  # raised whenever an entry's layout or what preparation produces changes


def input_files(data_cfg) -> dict[str, list[str]]:
    """The files a run reads, by config key (a glob expanded; a saved DatasetDict's own files)."""
    if data_cfg.source == "hf_disk":
        return {"data.train_path": dataset_dict_files(data_cfg.train_path)}
    given = {"data.train_path": data_cfg.train_path, "data.valid_path": data_cfg.valid_path,
             "data.test_path": data_cfg.test_path}
    return {key: expand_files(path, key) for key, path in given.items() if path}


def dataset_dict_files(root: str) -> list[str]:
    """The files `save_to_disk` wrote, read from its manifests. Not a directory listing: datasets
    writes `map` cache files beside them, which would change the key on every run."""
    manifest = os.path.join(root, "dataset_dict.json")
    files = [manifest]
    try:
        with open(manifest) as fh:
            splits = json.load(fh)["splits"]
        for split in splits:
            state = os.path.join(root, split, "state.json")
            with open(state) as fh:
                data_files = [f["filename"] for f in json.load(fh)["_data_files"]]
            files += [state, os.path.join(root, split, "dataset_info.json")]
            files += [os.path.join(root, split, name) for name in data_files]
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise DataError(f"data.train_path={root}: not a complete DatasetDict saved by "
                        f"save_to_disk ({one_line(exc)})") from None
    return files


def file_digest(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def prepared_key(data_cfg, tokenizer) -> str:
    """Key of a prepared result: input bytes + every data setting that matters + the tokenizer."""
    from omegaconf import OmegaConf

    settings = OmegaConf.to_container(data_cfg, resolve=True)
    payload = {
        "files": {key: [file_digest(f) for f in files]
                  for key, files in input_files(data_cfg).items()},
        "settings": {k: v for k, v in settings.items() if k not in NOT_IN_KEY},
        "tokenizer": tokenizer_fingerprint(tokenizer), "version": CACHE_VERSION,
        "datasets": datasets.__version__,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        # Calling the tokenizer stores truncation/padding settings in it: not part of its identity.
        state.pop("truncation", None)
        state.pop("padding", None)
        body = json.dumps(state, sort_keys=True)
    else:
        body = json.dumps(tokenizer.get_vocab(), sort_keys=True)
    extra = f"{tokenizer.padding_side}|{tokenizer.pad_token}|{len(tokenizer)}"
    return hashlib.sha256((body + extra).encode()).hexdigest()[:16]



def save_prepared(prepared: PreparedData, path: str) -> None:
    """Write the whole prepared result to a temp dir and rename it into place, so a crash never
    leaves a half-written entry and a reader sees either nothing or everything."""
    payload = {"label_map": prepared.label_map.to_json(),
               "serialization": prepared.serialization, "metadata": prepared.metadata}
    try:
        with writing(path, RERUN_HINT), atomic_path(path) as tmp, no_progress_bars():
            prepared.raw.save_to_disk(os.path.join(tmp, "raw"))
            prepared.tokenized.save_to_disk(os.path.join(tmp, "tokenized"))
            with open(os.path.join(tmp, "prepared.json"), "w") as fh:
                json.dump(payload, fh, indent=2)
    except (OSError, WriteError):
        if not os.path.isfile(os.path.join(path, "prepared.json")):
            raise
        # another process won the race: its entry is complete, and identical


def load_prepared(path: str) -> PreparedData | None:
    """The cached `PreparedData` at `path`, or None when there is no complete entry."""
    manifest = os.path.join(path, "prepared.json")
    if not os.path.isfile(manifest):
        return None
    with open(manifest) as fh:
        payload = json.load(fh)
    return PreparedData(raw=datasets.load_from_disk(os.path.join(path, "raw")),
                        tokenized=datasets.load_from_disk(os.path.join(path, "tokenized")),
                        label_map=LabelMap.from_json(payload["label_map"]),
                        serialization=payload["serialization"], metadata=payload["metadata"])
