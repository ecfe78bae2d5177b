"""Sweeps with and without pruning, side by side, and what a durable study costs per trial.

    python bench/sweep.py                          # the 20-trial optuna_f1 search on the ledger,
                                                   # pruner off vs median (hours on 2 CPU cores)
    python bench/sweep.py --datasets ledger debian --trials 20
    python bench/sweep.py --storage-only           # storage overhead per trial (seconds)
    python bench/sweep.py --tiny                   # tiny_bert smoke trials (a minute)
    python bench/sweep.py --datasets ledger debian --train-rows 800
                                                   # each train split cut to 800 rows (stratified;
                                                   # validation and test whole): ~4x cheaper trials
    python bench/sweep.py --pruners none median hyperband   # several pruners side by side

The sweeps of a data set (one per pruner) run the same command with the same sampler seed, one
after the other, each in a study of its own (a sqlite file in a temporary dir): wall time and its
ratio to the unpruned sweep's, trials pruned, the best validation objective and that trial's test
macro-F1 (model and blend). The storage part times what the sweeper and a trial do with the study
per trial (ask, 3 reports with a pruning check, tell), in memory, in a sqlite file and in a
journal file.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, compose_train, fill_defaults
from bench_data import DATASETS, dataset_overrides


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["ledger"], choices=list(DATASETS))
    parser.add_argument("--trials", type=int, default=None)
    parser.add_argument("--pruners", nargs="+", default=["none", "median"],
                        help="hydra/sweeper/pruner options, one sweep each (ratios against none)")
    parser.add_argument("--storage-only", action="store_true")
    parser.add_argument("--storage-trials", type=int, default=None)
    parser.add_argument("--tiny", action="store_true", help="tiny_bert smoke trials")
    parser.add_argument("--train-rows", type=int, default=None,
                        help="cut each train split to this many rows (stratified, every class "
                             "kept); validation and test stay whole")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every trial")
    args = parser.parse_args(argv)
    return fill_defaults(args, {"trials": 3, "storage_trials": 20},
                         {"trials": 20, "storage_trials": 200})


def storage_seconds_per_trial(kind: str, trials: int, work: str) -> float:
    """Seconds per trial of the study operations a sweep makes: ask, 3 reports each followed by
    a pruning check (median pruner), tell."""
    import optuna

    from lorasweep.tracking.study import open_storage, quiet_optuna

    storage = {"memory": None, "sqlite": f"{work}/{kind}.db",
               "journal": f"{work}/{kind}.journal"}[kind]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with quiet_optuna():
        study = optuna.create_study(storage=open_storage(storage), direction="maximize",
                                    pruner=optuna.pruners.MedianPruner(n_startup_trials=5))
        started = time.perf_counter()
        for number in range(trials):
            trial = study.ask()
            for step in range(1, 4):
                trial.report(0.5 + 0.001 * ((number * 7 + step) % 11), step)
                if trial.should_prune():
                    break
            study.tell(trial, 0.5 + 0.001 * (number % 13))
    return (time.perf_counter() - started) / trials


WRITERS = 4


def _writer(kind: str, path: str, name: str, trials: int, queue) -> None:
    import optuna

    from lorasweep.tracking.study import open_storage, quiet_optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    errors = []
    with quiet_optuna():
        study = optuna.load_study(study_name=name, storage=open_storage(path))
        for number in range(trials):
            try:
                trial = study.ask()
                trial.report(0.5, 1)
                trial.should_prune()
                study.tell(trial, 0.5 + 0.001 * number)
            except Exception as exc:  # noqa: BLE001  (counted: what the bench measures)
                errors.append(f"{type(exc).__name__}: {str(exc)[:80]}")
    queue.put(errors)


def concurrent_writers(kind: str, trials: int, work: str) -> tuple[int, list[str], float]:
    """WRITERS processes asking, reporting and telling on one study file at once: the trials
    the study ends with, the errors the writers met, the seconds it took."""
    import multiprocessing

    import optuna

    from lorasweep.tracking.study import open_storage, quiet_optuna

    path = f"{work}/concurrent.{'db' if kind == 'sqlite' else 'journal'}"
    with quiet_optuna():
        study = optuna.create_study(storage=open_storage(path), study_name="c",
                                    direction="maximize")
    queue = multiprocessing.get_context("spawn").Queue()
    procs = [multiprocessing.get_context("spawn").Process(
        target=_writer, args=(kind, path, "c", trials, queue)) for _ in range(WRITERS)]
    started = time.perf_counter()
    for proc in procs:
        proc.start()
    errors = [e for _ in procs for e in queue.get()]
    for proc in procs:
        proc.join()
    seconds = time.perf_counter() - started
    return len(study.get_trials(deepcopy=False)), errors, seconds


def cut_train(name: str, overrides: list[str], rows: int, work: str) -> list[str]:
    """The data set's own splits (the product's split for the ledger) written as parquet files,
    train cut to `rows` rows: the same share of every class, at least one row each."""
    from lorasweep.data.tables import read_table, split_table

    data = compose_train(overrides).data
    if data.valid_path:
        frames = {"train": read_table(data.train_path, "data.train_path").to_pandas(),
                  "validation": read_table(data.valid_path, "data.valid_path").to_pandas(),
                  "test": read_table(data.test_path, "data.test_path").to_pandas()}
    else:
        splits, _ = split_table(read_table(data.train_path, "data.train_path"),
                                data.label_column, data.val_size, data.test_size, data.seed)
        frames = {split: table.to_pandas() for split, table in splits.items()}
    train = frames["train"]
    share = rows / len(train)
    keep = [row for _, group in train.groupby(data.label_column)
            for row in group.sample(n=max(1, round(len(group) * share)),
                                    random_state=data.seed).index]
    frames["train"] = train.loc[sorted(keep)]
    out = Path(work, f"data-{name}")
    out.mkdir(parents=True, exist_ok=True)
    for split, frame in frames.items():
        frame.reset_index(drop=True).to_parquet(out / f"{split}.parquet")
    print(f"{name}: train cut to {len(frames['train'])} of {len(train)} rows; validation "
          f"{len(frames['validation'])}, test {len(frames['test'])} rows", flush=True)
    columns = ",".join(data.text_columns)
    return ["data=files", f"data.train_path={out}/train.parquet",
            f"data.valid_path={out}/validation.parquet", f"data.test_path={out}/test.parquet",
            f"data.label_column={data.label_column}", f"data.text_columns=[{columns}]",
            f"data.max_length={data.max_length}"]


def sweep(name: str, overrides: list[str], pruner: str, trials: int, work: str) -> dict:
    """One sweep; its wall time, trials pruned, best validation objective and that trial's
    test scores."""
    sweep_dir = Path(work, f"{name}-{pruner}")
    started = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "src" / "lorasweep" / "train.py"), "-m",
                    "hparams_search=optuna_f1", f"hydra.sweeper.n_trials={trials}",
                    f"hydra/sweeper/pruner={pruner}", "tracking=none", *overrides,
                    f"data.cache_dir={work}/cache", f"hydra.sweep.dir={sweep_dir}",
                    f"hydra.sweeper.storage={sweep_dir}/study.db"], cwd=ROOT, check=True)
    seconds = time.perf_counter() - started
    records = [json.loads(p.read_text()) for p in sweep_dir.glob("*/trial.json")]
    done = [r for r in records if r["status"] == "COMPLETE"]
    best = max(done, key=lambda r: r["objective"])
    metrics = json.loads(Path(best["run_dir"], "metrics.json").read_text())
    return {"seconds": seconds, "pruned": sum(r["status"] == "PRUNED" for r in records),
            "failed": sum(r["status"] == "FAIL" for r in records), "best_val": best["objective"],
            "test": metrics["test_f1_macro"], "test_blend": metrics.get("test_blend_f1_macro")}


def main(argv=None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lorasweep-bench-sweep-") as work:
        print(f"storage overhead per trial (ask, 3 reports + pruning checks, tell; "
              f"{args.storage_trials} trials):")
        memory = storage_seconds_per_trial("memory", args.storage_trials, work)
        for kind in ("memory", "sqlite", "journal"):
            seconds = (memory if kind == "memory"
                       else storage_seconds_per_trial(kind, args.storage_trials, work))
            print(f"  {kind:<8} {seconds * 1000:8.2f} ms/trial   {seconds / memory:6.1f}x memory")
        print(f"concurrent writers on one study file ({WRITERS} processes x "
              f"{args.storage_trials // 4} trials each, ask/report/tell as fast as they go):")
        for kind in ("sqlite", "journal"):
            trials, errors, seconds = concurrent_writers(kind, args.storage_trials // 4, work)
            print(f"  {kind:<8} {trials:5d} trials, {len(set(errors))} kinds of error "
                  f"({len(errors)} in all){': ' + errors[0] if errors else ''}, {seconds:.1f} s")
        if args.storage_only:
            return
        extra = ["model=tiny_bert", "training=smoke", "training.eval_strategy=steps",
                 "training.eval_steps=2", "baseline=none"] if args.tiny else []
        # median's startup trials (5 by default) would leave nothing to prune in a tiny sweep
        early = {"median": ["hydra.sweeper.pruner.n_startup_trials=1"]} if args.tiny else {}
        rows = []
        for name in args.datasets:
            data = dataset_overrides(name)
            if data is None:
                continue
            if args.train_rows:
                data = cut_train(name, data, args.train_rows, work)
            for pruner in args.pruners:
                rows.append((name, pruner, sweep(name, [*data, *extra, *early.get(pruner, []),
                                                        *args.overrides], pruner, args.trials,
                                                 work)))
                print(f"{name} {pruner}: {json.dumps(rows[-1][2])}", flush=True)
        cut = f", train cut to {args.train_rows} rows" if args.train_rows else ""
        print(f"\nsweep bench: {args.trials} trials of hparams_search=optuna_f1, pruners "
              f"{' vs '.join(args.pruners)} (same sampler seed{cut}; ratio: wall time / none's)")
        print(f"  {'data':<12}{'pruner':<20}{'wall s':>9}{'ratio':>7}{'pruned':>8}{'failed':>8}"
              f"{'best val':>10}{'its test':>10}{'blend':>8}")
        for name, pruner, r in rows:
            plain = next((other["seconds"] for n, p, other in rows
                          if n == name and p == "none"), None)
            ratio = f"{r['seconds'] / plain:>7.2f}" if plain else f"{'-':>7}"
            blend = "" if r["test_blend"] is None else f"{r['test_blend']:.4f}"
            print(f"  {name:<12}{pruner:<20}{r['seconds']:>9.0f}{ratio}{r['pruned']:>8}"
                  f"{r['failed']:>8}{r['best_val']:>10.4f}{r['test']:>10.4f}{blend:>8}")

if __name__ == "__main__":
    main()
