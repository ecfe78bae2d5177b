"""Training and evaluation speed of the default recipe, measured side by side in one process.

    python bench/eval_speed.py            # MiniLM on the sample ledger (a few minutes)
    python bench/eval_speed.py --tiny     # tiny_bert, a few steps and rows (the test suite)

(a) training samples/s, training.mixed_precision=auto vs no (fp32), alternating runs of
    `--steps` steps each (the first `--warmup` left out), best run of each kept.
(b) evaluation rows/s of the Trainer's own evaluation (Trainer.predict, as each epoch's and the
    final passes run it): rows sorted by length (what a run does) vs dataset order (what it did),
    on variable-length text (ledger rows with 0-7 more rows appended: p50 and p95 token lengths
    printed) and on the uniform ledger rows; at the precision auto gives here and in fp32.
(d) the sorted evaluation's batches cut by rows (the eval batch size, what a run does) vs by
    tokens (each batch filled up to eval batch size x the set's mean length in padded tokens, so
    short rows go in bigger batches and long ones in smaller), forward passes alone, at auto.

Trailing key=value arguments are Hydra overrides applied to every config.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from _common import fill_defaults
from throughput import compose_config, lorasweep_trainer, samples_per_second, train_overrides


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny_bert, few steps (seconds)")
    parser.add_argument("--steps", type=int, help="steps per training run, part (a)")
    parser.add_argument("--warmup", type=int, help="first steps left out of the timing")
    parser.add_argument("--repeats", type=int, help="alternating runs per side")
    parser.add_argument("--rows", type=int, help="rows per evaluation, part (b)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--parts", nargs="+", default=["a", "b", "d"], choices=["a", "b", "d"],
                        help="which parts to run ((c) comes with (b))")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides")
    args = parser.parse_args(argv)
    fill_defaults(args, tiny={"steps": 4, "warmup": 1, "repeats": 1, "rows": 64},
                  full={"steps": 30, "warmup": 3, "repeats": 2, "rows": 512})
    args.model = "tiny_bert" if args.tiny else "minilm"
    return args


def train_speed(args, work: str, precision: str) -> float:
    from step_timer import StepTimer

    cfg = compose_config([*train_overrides(args, args.steps),
                          f"training.mixed_precision={precision}"],
                         os.path.join(work, f"train-{precision}"), os.path.join(work, "cache"))
    timer = StepTimer()
    lorasweep_trainer(cfg, [timer]).train()
    return samples_per_second(timer, args.batch_size, args.warmup)


def bench_training(args, work: str) -> list:
    speeds = {"auto": [], "no": []}
    for _ in range(args.repeats):
        for precision in speeds:
            speeds[precision].append(train_speed(args, work, precision))
    auto, fp32 = max(speeds["auto"]), max(speeds["no"])
    runs = " / ".join(f"{a:.1f} vs {b:.1f}" for a, b in zip(speeds["auto"], speeds["no"],
                                                           strict=True))
    return [("(a) training auto / fp32, samples/s", f"{auto:.1f} / {fp32:.1f}", auto / fp32,
             f"batch {args.batch_size}, {args.steps} steps; runs: {runs}")]


def eval_sets(trainer, tokenizer, rows: int):
    """(name, dataset) pairs: variable-length rows and the uniform ledger rows, tokenized."""
    import datasets
    import numpy as np

    base = trainer.eval_dataset.select(range(min(rows, len(trainer.eval_dataset))))
    texts = [tokenizer.decode(list(ids), skip_special_tokens=True) for ids in base["input_ids"]]
    rng = np.random.default_rng(0)
    extra = rng.choice(8, size=len(texts), p=[.55, .15, .08, .06, .05, .04, .04, .03])
    varied = [" ; ".join(texts[(i + j) % len(texts)] for j in range(k + 1))
              for i, k in enumerate(extra)]
    sets = []
    for name, batch in (("variable-length", varied), ("uniform", texts)):
        encoded = tokenizer(batch, truncation=True, max_length=256)
        sets.append((name, datasets.Dataset.from_dict({**encoded,
                                                       "labels": base["labels"][:len(batch)]})))
    return sets


def eval_rows_per_second(trainer, dataset, sorted_rows: bool) -> float:
    from lorasweep.training.trainer import evaluate_split

    start = time.perf_counter()
    if sorted_rows:
        evaluate_split(trainer, dataset, "eval")
    else:
        trainer.predict(dataset, metric_key_prefix="eval")
    return len(dataset) / (time.perf_counter() - start)


def row_batches(lengths, size: int) -> list:
    order = np.argsort(lengths, kind="stable")
    return [order[i:i + size] for i in range(0, len(order), size)]


def token_batches(lengths, budget: int) -> list:
    """Sorted rows, each batch as long as (rows x its longest row) stays within budget."""
    batches, batch = [], []
    for index in np.argsort(lengths, kind="stable"):
        if batch and (len(batch) + 1) * lengths[index] > budget:
            batches.append(batch)
            batch = []
        batch.append(index)
    return batches + [batch] if batch else batches


def forward_rows_per_second(trainer, dataset, batches) -> float:
    import torch

    rows = [{k: v for k, v in row.items() if k != "labels"} for row in dataset]
    start = time.perf_counter()
    with torch.inference_mode(), trainer.autocast_smart_context_manager():
        for batch in batches:
            trainer.model(**trainer.data_collator([rows[int(i)] for i in batch]))
    return len(dataset) / (time.perf_counter() - start)


def bench_token_batches(args, work: str) -> list:
    cfg = compose_config(train_overrides(args, 1), os.path.join(work, "eval-tokens"),
                         os.path.join(work, "cache"))
    trainer = lorasweep_trainer(cfg, [])
    trainer.model.eval()
    size = trainer.args.per_device_eval_batch_size
    results = []
    for name, dataset in eval_sets(trainer, trainer.processing_class, args.rows):
        lengths = np.array([len(ids) for ids in dataset["input_ids"]])
        budget = int(size * lengths.mean())
        sides = {"rows": row_batches(lengths, size), "tokens": token_batches(lengths, budget)}
        speeds = {side: [] for side in sides}
        forward_rows_per_second(trainer, dataset.select(range(8)), [range(8)])  # warm-up
        for _ in range(args.repeats):
            for side, batches in sides.items():
                speeds[side].append(forward_rows_per_second(trainer, dataset, batches))
        by_tokens, by_rows = max(speeds["tokens"]), max(speeds["rows"])
        results.append((f"(d) eval batches by tokens / by rows, rows/s, {name}",
                        f"{by_tokens:.1f} / {by_rows:.1f}", by_tokens / by_rows,
                        f"{len(sides['tokens'])} vs {len(sides['rows'])} batches, budget "
                        f"{budget} tokens vs {size} rows"))
    return results


def bench_evaluation(args, work: str) -> list:
    results, best = [], {}
    for precision in ("auto", "no"):
        cfg = compose_config([*train_overrides(args, 1), f"training.mixed_precision={precision}"],
                             os.path.join(work, f"eval-{precision}"), os.path.join(work, "cache"))
        trainer = lorasweep_trainer(cfg, [])
        trainer.model.eval()
        for name, dataset in eval_sets(trainer, trainer.processing_class, args.rows):
            lengths = [len(ids) for ids in dataset["input_ids"]]
            p50, p95 = np.percentile(lengths, [50, 95])
            speeds = {True: [], False: []}
            for _ in range(args.repeats):  # alternating: drift in machine speed hits both
                for sorted_rows in speeds:
                    speeds[sorted_rows].append(eval_rows_per_second(trainer, dataset,
                                                                    sorted_rows))
            fast, slow = max(speeds[True]), max(speeds[False])
            best[precision, name] = fast, slow
            label = trainer.args.mixed_precision if precision == "auto" else "fp32"
            results.append((f"(b) eval sorted / dataset order, rows/s, {name}, {label}",
                            f"{fast:.1f} / {slow:.1f}", fast / slow,
                            f"{len(dataset)} rows, tokens p50 {p50:.0f} p95 {p95:.0f}, "
                            f"eval batch {trainer.args.per_device_eval_batch_size}"))
    for name in ("variable-length", "uniform"):  # the run's evaluation now vs before
        after, before = best["auto", name][0], best["no", name][1]
        results.append((f"(c) eval now (sorted, auto) / before (order, fp32), {name}",
                        f"{after:.1f} / {before:.1f}", after / before, "rows/s"))
    return results


def main(argv=None) -> None:
    import logging

    import transformers

    args = parse_args(argv)
    transformers.utils.logging.set_verbosity_error()
    logging.getLogger("lorasweep").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="lorasweep-bench-") as work:
        parts = {"a": bench_training, "b": bench_evaluation, "d": bench_token_batches}
        rows = [row for part in args.parts for row in parts[part](args, work)]
    lines = ["", f"lorasweep speed bench ({args.model}, CPU)",
             f"  {'measure':<70}{'values':>16}{'ratio':>8}  notes"]
    lines += [f"  {name:<70}{values:>16}{ratio:>8.2f}  {notes}"
              for name, values, ratio, notes in rows]
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
