"""Training and evaluation speed of the default recipe, measured side by side in one process.

    python bench/eval_speed.py            # MiniLM on the sample ledger (a few minutes)
    python bench/eval_speed.py --tiny     # tiny_bert, a few steps and rows (the test suite)

(a) training samples/s, training.mixed_precision=auto vs no (fp32), alternating runs of
    `--steps` steps each (the first `--warmup` left out), best run of each kept.
(b) evaluation rows/s of the Trainer's own evaluation (Trainer.predict, as each epoch's and the
    final passes run it), three sides alternating: rows sorted by length in batches cut by padded
    tokens (what a run does), sorted in batches of eval-batch-size rows, and dataset order in
    batches of rows (what it did); on variable-length text (ledger rows with 0-7 more rows
    appended: p50 and p95 token lengths printed) and on the uniform ledger rows; at the precision
    auto gives here and in fp32.
(c) the run's evaluation now (sorted, by tokens, auto) against before (dataset order, fp32).
(d) sorted, batches by tokens against batches by rows, at auto: what cutting by tokens adds.

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
    parser.add_argument("--parts", nargs="+", default=["a", "b"], choices=["a", "b"],
                        help="which parts to run ((c) and (d) come with (b))")
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


# tokens: sorted, batches by tokens (the run now); rows: sorted, batches of eval-batch-size rows;
# order: dataset order, batches of rows (before)
SIDES = ("tokens", "rows", "order")


def eval_rows_per_second(trainer, dataset, side: str) -> float:
    """Rows/s of one Trainer evaluation of `dataset` (Trainer.predict, as every evaluation of a
    run calls it), as `side` (SIDES) cuts its batches."""
    from lorasweep.training.trainer import evaluate_split

    trainer.eval_batches_by_tokens = side == "tokens"
    try:
        start = time.perf_counter()
        if side == "order":
            trainer.predict(dataset, metric_key_prefix="eval")
        else:
            evaluate_split(trainer, dataset, "eval")
        return len(dataset) / (time.perf_counter() - start)
    finally:
        trainer.eval_batches_by_tokens = True


def bench_evaluation(args, work: str) -> list:
    results, best = [], {}
    for precision in ("auto", "no"):
        cfg = compose_config([*train_overrides(args, 1), f"training.mixed_precision={precision}"],
                             os.path.join(work, f"eval-{precision}"), os.path.join(work, "cache"))
        trainer = lorasweep_trainer(cfg, [])
        trainer.model.eval()
        size = trainer.args.per_device_eval_batch_size
        for name, dataset in eval_sets(trainer, trainer.processing_class, args.rows):
            lengths = [len(ids) for ids in dataset["input_ids"]]
            p50, p95 = np.percentile(lengths, [50, 95])
            speeds = {side: [] for side in SIDES}
            for side in speeds:  # warm-up: the first pass of each side pays one-off costs
                eval_rows_per_second(trainer, dataset.select(range(8)), side)
            for _ in range(args.repeats):  # alternating: drift in machine speed hits every side
                for side in speeds:
                    speeds[side].append(eval_rows_per_second(trainer, dataset, side))
            fastest = {side: max(values) for side, values in speeds.items()}
            best[precision, name] = fastest
            label = trainer.args.mixed_precision if precision == "auto" else "fp32"
            results.append((f"(b) eval rows/s, sorted+tokens / order, {name}, {label}",
                            f"{fastest['tokens']:.1f} / {fastest['order']:.1f}",
                            fastest["tokens"] / fastest["order"],
                            f"{len(dataset)} rows, tokens p50 {p50:.0f} p95 {p95:.0f}, "
                            f"eval batch {size}"))
    for name in ("variable-length", "uniform"):  # the run's evaluation now vs before
        after, before = best["auto", name]["tokens"], best["no", name]["order"]
        results.append((f"(c) eval now (sorted+tokens, auto) / before (order, fp32), {name}",
                        f"{after:.1f} / {before:.1f}", after / before, "rows/s"))
    for name in ("variable-length", "uniform"):
        tokens, rows = best["auto", name]["tokens"], best["auto", name]["rows"]
        results.append((f"(d) eval sorted, batches by tokens / by rows, {name}",
                        f"{tokens:.1f} / {rows:.1f}", tokens / rows,
                        f"budget eval batch x mean length tokens vs {size} rows"))
    return results


def main(argv=None) -> None:
    import logging

    import transformers

    args = parse_args(argv)
    transformers.utils.logging.set_verbosity_error()
    logging.getLogger("lorasweep").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="lorasweep-bench-") as work:
        parts = {"a": bench_training, "b": bench_evaluation}
        rows = [row for part in args.parts for row in parts[part](args, work)]
    lines = ["", f"lorasweep speed bench ({args.model}, CPU)",
             f"  {'measure':<78}{'values':>16}{'ratio':>8}  notes"]
    lines += [f"  {name:<78}{values:>16}{ratio:>8.2f}  {notes}"
              for name, values, ratio, notes in rows]
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
