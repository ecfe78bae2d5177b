"""CPU training throughput of lorasweep, measured side by side in one process.

    python bench/throughput.py                 # MiniLM on the sample ledger (a few minutes)
    python bench/throughput.py --tiny          # tiny_bert, a few steps (seconds; the test suite)
    python bench/throughput.py --steps 60 --batch-size 32 data.max_length=128

(a) lorasweep's training path (its own building blocks: TrainingArguments, prepare_data, model,
    LoRA, loss, Trainer with its callbacks) vs a minimal hand-written HF Trainer + PEFT script:
    same model, rows, max_length, batch size, LoRA settings, sampling strategy and steps.
(b) dynamic padding + length-grouped batches vs padding="max_length" + random batches, at
    max_length 256: speed ratio and padded-token efficiency (real tokens / processed tokens).
(c) startup seconds: imports, config, data (tokenizer + read + split + tokenize), model load.

Speed is samples/s over the steps after `--warmup` steps, timed by one callback on both sides.
Trailing key=value arguments are Hydra overrides applied to every lorasweep config.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from _common import ROOT, compose_train, fill_defaults


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny_bert, few steps (seconds)")
    parser.add_argument("--steps", type=int, help="timed + warmup steps per run, part (a)")
    parser.add_argument("--pad-steps", type=int, help="steps per run, part (b)")
    parser.add_argument("--warmup", type=int, help="first steps left out of the timing")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, help="alternating runs per side in (a); best kept")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data.max_length=128")
    args = parser.parse_args(argv)
    # Defaults sized so the MiniLM run takes a few minutes on 2 CPU cores.
    fill_defaults(args, tiny={"steps": 4, "pad_steps": 3, "warmup": 1, "repeats": 1},
                  full={"steps": 40, "pad_steps": 6, "warmup": 2, "repeats": 2})
    args.model = "tiny_bert" if args.tiny else "minilm"
    return args


def compose_config(overrides, output_dir: str, cache_dir: str):
    """The real config tree (conf/train.yaml), as the CLI would compose it, validated."""
    from lorasweep.config import validate

    cfg = compose_train(["tracking=none", *overrides, f"output_dir={output_dir}",
                         f"data.cache_dir={cache_dir}"])
    validate(cfg)
    return cfg


def train_overrides(args, steps: int):
    return [f"model={args.model}", f"training.max_steps={steps}",
            f"training.per_device_train_batch_size={args.batch_size}",
            "training.eval_strategy=no", "training.save_strategy=no",
            "training.load_best_model_at_end=false", "training.disable_tqdm=true",
            *args.overrides]


def samples_per_second(timer, batch_size: int, warmup: int) -> float:
    stamps = timer.stamps[warmup:]
    if len(stamps) < 2:
        raise SystemExit(f"bench: need more steps than --warmup={warmup}")
    return (len(stamps) - 1) * batch_size / (stamps[-1] - stamps[0])


class TokenCounter:
    """Wraps a collator to count real (attention_mask) and processed (batch x length) tokens."""

    def __init__(self, collator):
        self.collator, self.real, self.processed = collator, 0, 0

    def __call__(self, features):
        batch = self.collator(features)
        mask = batch["attention_mask"]
        self.real += int(mask.sum())
        self.processed += mask.numel()
        return batch

    @property
    def efficiency(self) -> float:
        return self.real / max(self.processed, 1)


def lorasweep_trainer(cfg, callbacks):
    """lorasweep's training path (pipeline.train_and_save up to trainer.train), no eval/saving."""
    from lorasweep.data.prepare import prepare_data
    from lorasweep.model.losses import build_loss
    from lorasweep.model.modeling import apply_lora, base_model_path, build_model, load_tokenizer
    from lorasweep.training.trainer import build_trainer, build_training_arguments

    base_path = base_model_path(cfg.model, cfg.data.cache_dir, cfg.seed)
    args = build_training_arguments(cfg.training, cfg.output_dir, cfg.seed, None)
    tokenizer = load_tokenizer(cfg.model)
    data = prepare_data(cfg.data, tokenizer)
    model = apply_lora(build_model(cfg.model, data.label_map, tokenizer, base_path), cfg.lora)
    loss_fn = build_loss(cfg.loss, data.tokenized["train"]["labels"], len(data.label_map.labels))
    return build_trainer(model, args, data.tokenized, tokenizer, loss_fn, callbacks)


def handwritten_trainer(cfg, callbacks):
    """What a user would write by hand with HF Trainer + PEFT for the same job."""
    import pandas as pd
    from datasets import Dataset
    from peft import LoraConfig, TaskType, get_peft_model
    from sklearn.model_selection import train_test_split
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    from lorasweep.model.modeling import base_model_path, peft_targets

    d = cfg.data
    table = pd.read_parquet(ROOT / d.train_path if not os.path.isabs(d.train_path)
                            else d.train_path)
    train, _ = train_test_split(table, test_size=d.val_size + d.test_size, random_state=d.seed,
                                stratify=table[d.label_column])
    labels = sorted(table[d.label_column].astype(str).unique())
    columns = list(d.text_columns) or [c for c in table.columns if c != d.label_column]
    texts = [", ".join(f"{c}: {row[c]}" for c in columns if pd.notna(row[c]))
             for _, row in train.iterrows()]
    tok = AutoTokenizer.from_pretrained(cfg.model.tokenizer_name_or_path or cfg.model.name_or_path)
    ds = Dataset.from_dict({"text": texts, "labels": [labels.index(str(v)) for v in
                                                      train[d.label_column]]})
    ds = ds.map(lambda b: tok(b["text"], truncation=True, max_length=d.max_length),
                batched=True, remove_columns=["text"])
    model = AutoModelForSequenceClassification.from_pretrained(
        base_model_path(cfg.model, d.cache_dir, cfg.seed), num_labels=len(labels))
    model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=cfg.lora.r,
                                             lora_alpha=cfg.lora.alpha,
                                             lora_dropout=cfg.lora.dropout,
                                             target_modules=peft_targets(cfg.lora.target_modules)))
    t = cfg.training
    args = TrainingArguments(
        output_dir=os.path.join(cfg.output_dir, "hf"), max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_train_batch_size,
        learning_rate=t.learning_rate, logging_steps=t.logging_steps,
        train_sampling_strategy=t.train_sampling_strategy, save_strategy="no",
        eval_strategy="no", report_to="none", disable_tqdm=True, seed=cfg.seed)
    return Trainer(model=model, args=args, train_dataset=ds,
                   data_collator=DataCollatorWithPadding(tok), callbacks=callbacks)


def timed_run(build, cfg, batch_size: int, warmup: int) -> dict:
    from step_timer import StepTimer

    timer = StepTimer()
    trainer = build(cfg, [timer])
    counter = TokenCounter(trainer.data_collator)
    trainer.data_collator = counter  # the train dataloader is built from it in train()
    trainer.train()
    return {"samples_per_s": samples_per_second(timer, batch_size, warmup),
            "efficiency": counter.efficiency}


def bench_vs_hf(args, work: str) -> list:
    """(a) Alternate lorasweep and hand-written runs so drift in machine speed hits both."""
    cfg = compose_config(train_overrides(args, args.steps), os.path.join(work, "a"),
                         os.path.join(work, "cache"))
    ours, theirs = [], []
    for _ in range(args.repeats):
        ours.append(timed_run(lorasweep_trainer, cfg, args.batch_size, args.warmup))
        theirs.append(timed_run(handwritten_trainer, cfg, args.batch_size, args.warmup))
    best_ours = max(r["samples_per_s"] for r in ours)
    best_theirs = max(r["samples_per_s"] for r in theirs)
    runs = " / ".join(f"{a['samples_per_s']:.1f} vs {b['samples_per_s']:.1f}"
                      for a, b in zip(ours, theirs, strict=True))
    return [("(a) lorasweep / hand-written HF Trainer, samples/s",
             f"{best_ours:.1f} / {best_theirs:.1f}", best_ours / best_theirs, ">= 0.95",
             f"max_length {cfg.data.max_length}, batch {args.batch_size}, {args.steps} steps; "
             f"runs: {runs}")]


def bench_padding(args, work: str) -> list:
    """(b) Same rows at max_length 256: dynamic + length-grouped vs padded to 256, random."""
    common = [*train_overrides(args, args.pad_steps), "data.max_length=256"]
    results = {}
    for name, extra in (("dynamic", ["data.padding=longest",
                                     "training.train_sampling_strategy=group_by_length"]),
                        ("max_length", ["data.padding=max_length",
                                        "training.train_sampling_strategy=random"])):
        cfg = compose_config([*common, *extra], os.path.join(work, name),
                             os.path.join(work, "cache"))
        results[name] = timed_run(lorasweep_trainer, cfg, args.batch_size, args.warmup)
    fast, slow = results["dynamic"], results["max_length"]
    return [("(b) dynamic+grouped / max_length padding, samples/s",
             f"{fast['samples_per_s']:.1f} / {slow['samples_per_s']:.1f}",
             fast["samples_per_s"] / slow["samples_per_s"], ">= 2", f"{args.pad_steps} steps"),
            ("(b) padded-token efficiency, dynamic+grouped", "real/processed tokens",
             fast["efficiency"], ">= 0.9", f"max_length padding: {slow['efficiency']:.3f}")]


def bench_startup(args, work: str) -> dict:
    """(c) Seconds per startup phase; first in the process so the imports are really cold."""
    seconds = {}
    start = time.perf_counter()
    import peft  # noqa: F401  (apply_lora imports it lazily; count it here)

    import lorasweep.training.pipeline  # noqa: F401  (torch, transformers, datasets, deepspeed config)
    seconds["imports"] = time.perf_counter() - start
    start = time.perf_counter()
    cfg = compose_config(train_overrides(args, args.steps), os.path.join(work, "startup"),
                         os.path.join(work, "cache"))
    seconds["config"] = time.perf_counter() - start
    from lorasweep.data.prepare import prepare_data
    from lorasweep.model.modeling import apply_lora, base_model_path, build_model, load_tokenizer

    start = time.perf_counter()
    tokenizer = load_tokenizer(cfg.model)
    data = prepare_data(cfg.data, tokenizer)  # fresh cache dir: reads, splits and tokenizes
    seconds["data (cold cache)"] = time.perf_counter() - start
    start = time.perf_counter()
    prepare_data(cfg.data, tokenizer)
    seconds["data (warm cache)"] = time.perf_counter() - start
    start = time.perf_counter()
    base_path = base_model_path(cfg.model, cfg.data.cache_dir, cfg.seed)
    apply_lora(build_model(cfg.model, data.label_map, tokenizer, base_path), cfg.lora)
    seconds["model load + LoRA"] = time.perf_counter() - start
    return seconds


def format_tables(startup: dict, ratios: list) -> str:
    lines = ["", "lorasweep throughput bench (CPU)",
             f"  {'measure':<52}{'values':>18}{'ratio':>9}  {'target':<8} {'met':<4} notes"]
    for name, values, ratio, target, notes in ratios:
        op, goal = target.split()
        met = ratio >= float(goal) if op == ">=" else ratio <= float(goal)
        lines.append(f"  {name:<52}{values:>18}{ratio:>9.3f}  {target:<8} "
                     f"{'yes' if met else 'NO':<4} {notes}")
    lines += ["", f"  {'startup phase':<28}{'seconds':>9}"]
    for phase, secs in startup.items():
        lines.append(f"  {phase:<28}{secs:>9.2f}")
    total = sum(v for k, v in startup.items() if k != "data (warm cache)")
    lines.append(f"  {'total (cold cache)':<28}{total:>9.2f}")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lorasweep-bench-") as work:
        startup = bench_startup(args, work)
        import logging

        import transformers

        transformers.utils.logging.set_verbosity_error()  # keep the load reports out of the table
        logging.getLogger("lorasweep").setLevel(logging.WARNING)
        ratios = bench_vs_hf(args, work) + bench_padding(args, work)
    print(format_tables(startup, ratios), flush=True)


if __name__ == "__main__":
    main()
