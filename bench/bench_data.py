"""Realistic data sets for the quality bench, built offline on this machine, kept out of the repo.

    python bench/bench_data.py           # writes .cache/lorasweep/bench_data/debian_sections/

debian_sections: real, human-written text with a real long-tailed label. Every Debian package in
the apt lists has a maintainer-chosen archive section (libs, python, science, games, ... 58 in
bookworm main) and a one-line summary. A row is `package` + `summary` -> `section`. 10,000
packages drawn with a fixed seed from `apt-cache dumpavail`; sections with fewer than 10 of them
dropped; split 4,000 train / 1,000 validation / the rest test, stratified. To rebuild on a fresh
machine: `apt-get update` (fills the apt lists), then this script. The table depends on the
archive's state that day: the script prints the sha256 of what it wrote.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pandas as pd

from _common import ROOT

OUT = ROOT / ".cache" / "lorasweep" / "bench_data"
SEED = 20261124
SAMPLE, TRAIN, VALIDATION, MIN_ROWS = 10_000, 4_000, 1_000, 10


def debian_packages() -> pd.DataFrame:
    """Every package stanza of the apt lists: name, section (archive prefix removed), summary."""
    text = subprocess.run(["apt-cache", "dumpavail"], capture_output=True, text=True,
                          check=True).stdout
    rows = []
    for stanza in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in stanza.splitlines()
                      if ": " in line and not line.startswith(" "))
        if {"Package", "Section", "Description"} <= fields.keys():
            rows.append({"package": fields["Package"],
                         "summary": fields["Description"].strip(),
                         "section": fields["Section"].rsplit("/", 1)[-1]})
    if not rows:
        raise SystemExit("apt-cache dumpavail listed no packages: run `apt-get update` first")
    return pd.DataFrame(rows).drop_duplicates("package").sort_values("package")


def debian_sections(out: Path = OUT / "debian_sections") -> dict:
    """Write train/validation/test parquet files; return the Hydra overrides that select them."""
    from sklearn.model_selection import train_test_split

    sample = debian_packages().sample(n=SAMPLE, random_state=SEED)
    counts = sample["section"].value_counts()
    sample = sample[sample["section"].isin(counts[counts >= MIN_ROWS].index)]
    train, rest = train_test_split(sample, train_size=TRAIN, stratify=sample["section"],
                                   random_state=SEED)
    validation, test = train_test_split(rest, train_size=VALIDATION, stratify=rest["section"],
                                        random_state=SEED)
    out.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    for name, frame in (("train", train), ("validation", validation), ("test", test)):
        path = out / f"{name}.parquet"
        frame.reset_index(drop=True).to_parquet(path, index=False)
        digest.update(path.read_bytes())
        print(f"wrote {path} ({len(frame)} rows)")
    print(f"debian_sections: {sample['section'].nunique()} sections, sha256 {digest.hexdigest()}")
    return data_overrides(out)


def data_overrides(out: Path = OUT / "debian_sections") -> list:
    return ["data=files", f"data.train_path={out / 'train.parquet'}",
            f"data.valid_path={out / 'validation.parquet'}",
            f"data.test_path={out / 'test.parquet'}", "data.label_column=section",
            "data.text_columns=[package,summary]", "data.max_length=64"]


if __name__ == "__main__":
    debian_sections()
