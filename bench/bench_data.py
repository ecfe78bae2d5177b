"""Realistic data sets for the quality bench, built offline on this machine, kept out of the repo.

    python bench/bench_data.py           # writes .cache/lorasweep/bench_data/<name>/ for each set
    python bench/bench_data.py wordnet   # one of them

debian_sections: real, human-written text with a real long-tailed label. Every Debian package in
the apt lists has a maintainer-chosen archive section (libs, python, science, games, ... 58 in
bookworm main) and a one-line summary. A row is `package` + `summary` -> `section`. 10,000
packages drawn with a fixed seed from `apt-cache dumpavail`; sections with fewer than 10 of them
dropped; split 4,000 train / 1,000 validation / the rest test, stratified. To rebuild on a fresh
machine: `apt-get update` (fills the apt lists), then this script. The table depends on the
archive's state that day: the script prints the sha256 of what it wrote.

wordnet_glosses: natural-language sentences whose class is their meaning. Every WordNet 3.0
synset has a gloss (a definition, often with example sentences) and one of 45 lexicographer
files, its semantic field: noun.animal, noun.artifact, noun.feeling, verb.motion, adj.pert, ...
A row is the gloss alone (not the words it defines) -> the field. 10,000 synsets drawn with a
fixed seed from Debian's `wordnet-base` package (`apt-get install wordnet-base`), split like
debian_sections. WordNet 3.0 is frozen, so the table is the same on every machine.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
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


def debian_sections(out: Path = OUT / "debian_sections") -> list:
    """Write train/validation/test parquet files; return the Hydra overrides that select them."""
    write_splits(debian_packages(), "section", out)
    return data_overrides("debian")


# WordNet 3.0's lexicographer files, by their number in the data files (lexnames(5WN))
LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute "
    "noun.body noun.cognition noun.communication noun.event noun.feeling noun.food noun.group "
    "noun.location noun.motive noun.object noun.person noun.phenomenon noun.plant "
    "noun.possession noun.process noun.quantity noun.relation noun.shape noun.state "
    "noun.substance noun.time verb.body verb.change verb.cognition verb.communication "
    "verb.competition verb.consumption verb.contact verb.creation verb.emotion verb.motion "
    "verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl").split()
WORDNET = Path("/usr/share/wordnet")  # Debian's wordnet-base


def wordnet_synsets(root: Path = WORDNET) -> pd.DataFrame:
    """Every synset of the WordNet data files: its gloss and its lexicographer file."""
    rows = []
    for pos in ("noun", "verb", "adj", "adv"):
        path = root / f"data.{pos}"
        if not path.is_file():
            raise SystemExit(f"{path}: not found: `apt-get install wordnet-base` first")
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("  ") or " | " not in line:  # the licence header
                continue
            fields, gloss = line.split(" | ", 1)
            rows.append({"gloss": gloss.strip(), "lexname": LEXNAMES[int(fields.split()[1])]})
    return pd.DataFrame(rows)


def wordnet_glosses(out: Path = OUT / "wordnet_glosses") -> list:
    write_splits(wordnet_synsets(), "lexname", out)
    return data_overrides("wordnet")


def write_splits(table: pd.DataFrame, label: str, out: Path) -> None:
    """SAMPLE rows drawn with SEED; classes under MIN_ROWS dropped; TRAIN / VALIDATION / the rest
    as test, stratified; parquet files in `out`, and the sha256 of what was written."""
    from sklearn.model_selection import train_test_split

    sample = table.sample(n=SAMPLE, random_state=SEED)
    counts = sample[label].value_counts()
    sample = sample[sample[label].isin(counts[counts >= MIN_ROWS].index)]
    train, rest = train_test_split(sample, train_size=TRAIN, stratify=sample[label],
                                   random_state=SEED)
    validation, test = train_test_split(rest, train_size=VALIDATION, stratify=rest[label],
                                        random_state=SEED)
    out.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    for name, frame in (("train", train), ("validation", validation), ("test", test)):
        path = out / f"{name}.parquet"
        frame.reset_index(drop=True).to_parquet(path, index=False)
        digest.update(path.read_bytes())
        print(f"wrote {path} ({len(frame)} rows)")
    print(f"{out.name}: {sample[label].nunique()} classes, sha256 {digest.hexdigest()}")


# name: (directory under OUT, label column, text columns, max_length, builder)
SETS = {
    "debian": ("debian_sections", "section", "package,summary", 64, debian_sections),
    "wordnet": ("wordnet_glosses", "lexname", "gloss", 128, wordnet_glosses),
}


# Every data set the quality and sweep benches take: the shipped ledgers (Hydra overrides) and the
# built sets above
SHIPPED = {"ledger": [], "new_vendors": ["data=ledger_new_vendors"]}
DATASETS = [*SHIPPED, *SETS]


def dataset_overrides(name: str) -> list | None:
    """The Hydra overrides that select a data set, or None when it is not built here."""
    return SHIPPED[name] if name in SHIPPED else data_overrides(name)


def data_overrides(name: str = "debian") -> list | None:
    """The Hydra overrides that select a built set, or None (and a line saying how to build it)."""
    folder, label, text, max_length, _ = SETS[name]
    out = OUT / folder
    if not (out / "train.parquet").is_file():
        print(f"{name}: not built (run `python bench/bench_data.py {name}`)")
        return None
    return ["data=files", f"data.train_path={out / 'train.parquet'}",
            f"data.valid_path={out / 'validation.parquet'}",
            f"data.test_path={out / 'test.parquet'}", f"data.label_column={label}",
            f"data.text_columns=[{text}]", f"data.max_length={max_length}"]


if __name__ == "__main__":
    for name in sys.argv[1:] or list(SETS):
        SETS[name][-1]()
