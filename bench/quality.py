"""Test macro-F1 per data set: majority class, TF-IDF + LR, frozen-encoder probe, lorasweep's
defaults (the fine-tuned model alone, and blended with the TF-IDF model as predict.py applies it),
and (optionally) the best of an Optuna sweep, all on the same split.

    python bench/quality.py                          # the three data sets, default recipe
    python bench/quality.py --datasets ledger        # of: ledger, new_vendors, debian, wordnet
    python bench/quality.py --seeds 42 7 1234        # the default recipe at three training seeds
    python bench/quality.py --sweep-trials 20    # + a 20-trial sweep per data set (hours on CPU)
    python bench/quality.py --tiny                   # tiny_bert smoke run on the ledger (seconds)
    python bench/quality.py --datasets ledger lora.r=16   # key=value words: Hydra overrides

Data sets: `ledger` (the shipped sample, split by lorasweep), `new_vendors` (its variant whose
validation/test vendors never appear in train), `debian` (Debian packages' one-line summaries ->
archive section, real text) and `wordnet` (WordNet glosses -> semantic field, natural-language
sentences): both built by bench/bench_data.py, skipped if absent.
The probe, TF-IDF and blend rows come from the lorasweep run itself (every run fits the probe and
the TF-IDF model on its train split, and picks the blend weight on validation); the majority row
predicts the train split's most frequent class for every test row. The ceiling row (the two
generated ledgers) scores a reader that gets every test row right that can be got right: all but
the generator's flipped labels, whose own vendor and description point to another code.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from _common import ROOT, compose_train
from bench_data import DATASETS, dataset_overrides

sys.path.insert(0, str(ROOT / "data" / "sample_ledger"))  # generate.py: the ledgers' generator

GENERATED = ("ledger", "new_vendors")  # written by data/sample_ledger/generate.py
ROWS = (("label-noise ceiling", "ceiling"), ("majority class", "majority"),
        ("TF-IDF + logistic regression", "baseline"),
        ("frozen encoder + linear probe", "probe"), ("lorasweep defaults: model", "model"),
        ("lorasweep defaults: blend", "blend"), ("lorasweep sweep best: model", "sweep"),
        ("lorasweep sweep best: blend", "sweep_blend"))


def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    # key=value words are Hydra overrides wherever they stand (after `--seeds 42 7`, argparse
    # would take them for seeds).
    overrides = [word for word in argv if "=" in word and not word.startswith("-")]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="key=value words, anywhere: Hydra overrides, e.g. "
                                            "lora.r=16")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--sweep-trials", type=int, default=0,
                        help="run hparams_search=optuna_f1 with this many trials per data set")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="training seeds (the top-level `seed`) of the default recipe's runs; "
                             "each row then shows their mean (default: one run at the config's)")
    parser.add_argument("--tiny", action="store_true", help="tiny_bert smoke run (seconds)")
    args = parser.parse_args([word for word in argv if word not in overrides])
    args.overrides = overrides
    return args


def default_run(name: str, overrides, work: str) -> dict:
    """One lorasweep run with the default recipe; its test metrics and the comparison rows."""
    from lorasweep.training.pipeline import run

    cfg = compose_train(["tracking=none", *overrides, f"output_dir={work}/run",
                         f"data.cache_dir={work}/cache"])
    started = time.perf_counter()
    metrics = run(cfg)
    seconds = time.perf_counter() - started
    test_rows = pd.read_csv(Path(work, "run", "reports", "predictions_test.csv"),
                            dtype={"label": str})
    result = {"model": metrics["test_f1_macro"], "seconds": seconds,
              "majority": majority_f1(f"{work}/run", test_rows["label"]),
              "ceiling": ceiling_f1(test_rows) if name in GENERATED else None,
              "best_epoch": metrics.get("best_epoch"), "blend_weight": metrics.get("blend_weight")}
    for key in ("baseline", "probe", "blend"):
        result[key] = metrics.get(f"test_{key}_f1_macro")
    result["parts_seconds"] = {k: round(metrics[k], 1) for k in
                               ("probe_seconds", "baseline_seconds", "train_runtime")
                               if k in metrics}
    return result


def majority_f1(run_dir: str, truth: pd.Series) -> float:
    from sklearn.metrics import f1_score

    meta = json.loads(Path(run_dir, "dataset_metadata.json").read_text())
    counts = meta["class_counts"]["train"]
    majority = max(counts, key=counts.get)
    return float(f1_score(truth, [majority] * len(truth), average="macro", zero_division=0))


def ceiling_f1(rows: pd.DataFrame) -> float:
    """Macro-F1 of reading every test row (a run's predictions_test.csv: serialized text, label)
    by its own vendor and description: right wherever the label is one of the codes they point
    to, the pointed-to code where it is not (a flip)."""
    from generate import codes_read_from
    from sklearn.metrics import f1_score

    best = []
    for text, label in zip(rows["text"], rows["label"], strict=True):
        vendor, description = re.match(r"vendor: (.*?), description: (.*?), amount:", text).groups()
        codes = codes_read_from(vendor, description)
        best.append(label if label in codes else min(codes))
    return float(f1_score(rows["label"], best, average="macro", zero_division=0))


def sweep_best(overrides, trials: int, work: str) -> tuple:
    """Test macro-F1 of the trial with the best objective (eval macro-F1) of an Optuna sweep:
    the model's, and its blend's."""
    sweep_dir = Path(work, "sweep")
    subprocess.run([sys.executable, str(ROOT / "src" / "lorasweep" / "train.py"), "-m",
                    "hparams_search=optuna_f1", f"hydra.sweeper.n_trials={trials}",
                    "tracking=none", *overrides, f"data.cache_dir={work}/cache",
                    f"hydra.sweep.dir={sweep_dir}", f"hydra.sweeper.storage={work}/study.db"],
                   cwd=ROOT, check=True)
    records = [json.loads(p.read_text()) for p in sweep_dir.glob("*/trial.json")]
    best = max((r for r in records if r["status"] == "COMPLETE"), key=lambda r: r["objective"])
    metrics = json.loads(Path(best["run_dir"], "metrics.json").read_text())
    return metrics["test_f1_macro"], metrics.get("test_blend_f1_macro")


def format_table(results: dict) -> str:
    names = list(results)
    runs = len(results[names[0]]["runs"]) if names else 1
    mean = f"; the defaults' rows: the mean of {runs} seeds" if runs > 1 else ""
    lines = ["", f"quality bench: test macro-F1 (same split per data set{mean})",
             f"  {'system':<32}" + "".join(f"{n:>14}" for n in names)]
    for label, key in ROWS:
        cells = "".join(f"{results[n][key]:>14.4f}" if results[n].get(key) is not None
                        else f"{'n/a' if key == 'ceiling' else 'not run':>14}" for n in names)
        lines.append(f"  {label:<32}{cells}")
    lines.append(f"  {'defaults: run seconds':<32}"
                 + "".join(f"{results[n]['seconds']:>14.0f}" for n in names))
    for n in names:
        for run in results[n]["runs"]:
            seed = f"seed {run['seed']}: " if run["seed"] is not None else ""
            blend = "none" if run["blend"] is None else f"{run['blend']:.4f}"
            lines.append(f"  {n}: {seed}model {run['model']:.4f}, blend {blend} (model weight "
                         f"{run['blend_weight']}), best epoch {run['best_epoch']}, "
                         f"seconds {run['parts_seconds']}")
    return "\n".join(lines)


def mean_of_runs(runs: list) -> dict:
    """One column of the table: each row's mean over the seeds' runs (None where a run has none)."""
    result = {"runs": runs}
    for key in ("model", "blend", "baseline", "probe", "majority", "ceiling", "seconds"):
        values = [run[key] for run in runs if run.get(key) is not None]
        result[key] = sum(values) / len(values) if values else None
    return result


def main(argv=None) -> None:
    args = parse_args(argv)
    preset = ["model=tiny_bert", "training=smoke"] if args.tiny else []
    results = {}
    for name in (["ledger"] if args.tiny else args.datasets):
        data = dataset_overrides(name)
        if data is None:
            continue
        overrides = [*data, *preset, *args.overrides]
        runs = []
        for seed in args.seeds or [None]:
            seeded = overrides if seed is None else [*overrides, f"seed={seed}"]
            with tempfile.TemporaryDirectory(prefix=f"lorasweep-quality-{name}-") as work:
                runs.append({"seed": seed, **default_run(name, seeded, work)})
        results[name] = mean_of_runs(runs)
        if args.sweep_trials:
            with tempfile.TemporaryDirectory(prefix=f"lorasweep-quality-{name}-") as work:
                results[name]["sweep"], results[name]["sweep_blend"] = sweep_best(
                    overrides, args.sweep_trials, work)
        print(f"{name}: {json.dumps(results[name])}", flush=True)
    print(format_table(results), flush=True)


if __name__ == "__main__":
    main()
