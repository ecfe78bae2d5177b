"""LoRA sequence-classification training speed of a Qwen2-0.5B-shaped model on one GPU.

    python bench/gpu.py                          # bf16, seq 512, deepspeed none/zero2/zero3 x GC
    python bench/gpu.py --peak-tflops 1979       # another GPU's dense bf16 peak (for MFU)
    python bench/gpu.py --tiny                   # tiny shapes, fp32, CPU, a few steps (tests)

Random weights from a Qwen2Config (hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate 4864,
vocab 151936): nothing is downloaded. Rows are random token ids, all `--seq-len` long, so every
step processes exactly batch x seq_len tokens. The model, LoRA, DeepSpeed dict, TrainingArguments
and Trainer all come from lorasweep's own building blocks and conf/ files.

Each variant runs in its own process: DeepSpeed engines, ZeRO-3's parameter hooks and accelerate's
state are per process and do not come apart cleanly.

MFU = model FLOPs per step / step time / peak FLOPs, with model FLOPs per token =
6 x (non-embedding parameters) + 12 x layers x hidden x seq_len (attention scores and values,
forward + backward; PaLM, appendix B). Embedding lookups do no matmul work, so they are left out.
Recomputation under gradient checkpointing is not counted (that would be HFU), and neither is the
saving from LoRA's frozen weights, so numbers compare with full fine-tuning reports.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from _common import compose_train, fill_defaults

QWEN2_0_5B = dict(model_type="qwen2", hidden_size=896, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864,
                  vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0,
                  tie_word_embeddings=True)
TINY = dict(model_type="qwen2", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=128, vocab_size=2048,
            max_position_embeddings=512, tie_word_embeddings=False)
VARIANTS = [(ds, gc) for ds in ("none", "zero2", "zero3") for gc in (False, True)]
# ZeRO on CPU builds a gloo process group and DeepSpeed engine per variant (about 30 s to start);
# under --tiny ZeRO-3 without checkpointing stands for both stages (ZeRO-2 shares its path up to
# the DeepSpeed dict, and the 2-rank tests train both), enough to prove the path works.
TINY_SKIPPED = [("zero2", False), ("zero2", True), ("zero3", True)]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, fp32, CPU, few steps")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="dense bf16 peak of the GPU in TFLOP/s (H100 SXM: 989)")
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--steps", type=int, help="steps per variant, warmup included")
    parser.add_argument("--warmup", type=int, help="first steps left out of the timing")
    parser.add_argument("--num-labels", type=int, default=26)
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant
    parser.add_argument("--gc", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--json-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    return fill_defaults(args, tiny={"seq_len": 64, "batch_size": 2, "steps": 4, "warmup": 1},
                         full={"seq_len": 512, "batch_size": 8, "steps": 20, "warmup": 5})


def compose_config(args, work: str, deepspeed: str, gc: bool):
    """conf/train.yaml with the tiny_qwen2 tokenizer and the benchmark's shapes and settings."""
    from omegaconf import open_dict

    on_gpu = not args.tiny
    cfg = compose_train([
        "model=tiny_qwen2", f"deepspeed={deepspeed}", "tracking=none",
        f"model.gradient_checkpointing={gc}",
        f"model.dtype={'bfloat16' if on_gpu else 'float32'}",
        f"training.mixed_precision={'bf16' if on_gpu else 'no'}",
        f"training.max_steps={args.steps}",
        f"training.per_device_train_batch_size={args.batch_size}",
        "training.eval_strategy=no", "training.save_strategy=no",
        "training.load_best_model_at_end=false",
        "training.disable_tqdm=true", "training.logging_steps=1000000",
        "training.warmup_steps=0", f"output_dir={work}/run", f"data.cache_dir={work}/cache"])
    with open_dict(cfg):
        cfg.model.arch = dict(TINY if args.tiny else QWEN2_0_5B)
    return cfg


def synthetic_rows(n_rows: int, seq_len: int, vocab: int, pad_id: int, num_labels: int):
    """Full-length rows of random ids (never the pad id, so every position is a real token)."""
    import datasets
    import numpy as np

    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab - 1, size=(n_rows, seq_len))
    ids[ids >= pad_id] += 1  # skip pad_id
    return datasets.Dataset.from_dict({
        "input_ids": ids.tolist(), "attention_mask": np.ones_like(ids).tolist(),
        "labels": rng.integers(0, num_labels, size=n_rows).tolist()})


def build_variant(args, cfg, timer):
    """lorasweep's path: base model before TrainingArguments (ZeRO-3), then model, LoRA, Trainer."""
    from lorasweep.data.labels import LabelMap
    from lorasweep.model.losses import build_loss
    from lorasweep.model.modeling import (
        apply_lora,
        base_model_path,
        build_model,
        count_parameters,
        load_tokenizer,
    )
    from lorasweep.training.deepspeed_config import build_deepspeed_config
    from lorasweep.training.trainer import build_trainer, build_training_arguments

    ds_config = build_deepspeed_config(cfg.deepspeed)
    base_path = base_model_path(cfg.model, cfg.data.cache_dir, cfg.seed)
    training_args = build_training_arguments(cfg.training, cfg.output_dir, cfg.seed, ds_config)
    tokenizer = load_tokenizer(cfg.model)
    label_map = LabelMap(labels=[f"class{i}" for i in range(args.num_labels)],
                         num_real=args.num_labels)
    model = build_model(cfg.model, label_map, tokenizer, base_path)
    arch = cfg.model.arch
    embedding = arch.vocab_size * arch.hidden_size
    non_embedding = count_parameters(model)["total"] - embedding
    model = apply_lora(model, cfg.lora)
    rows = synthetic_rows(args.batch_size * args.steps, args.seq_len, arch.vocab_size,
                          tokenizer.pad_token_id, args.num_labels)
    loss_fn = build_loss(cfg.loss, rows["labels"], args.num_labels)
    trainer = build_trainer(model, training_args, {"train": rows, "validation": rows}, tokenizer,
                            loss_fn, [timer])
    return trainer, non_embedding, count_parameters(model)["trainable"]


def run_variant(args) -> dict:
    """Train one variant for `--steps` steps; its speed, memory and MFU figures."""
    import torch

    from step_timer import StepTimer

    gc = bool(args.gc)
    with tempfile.TemporaryDirectory(prefix="lorasweep-gpu-") as work:
        cfg = compose_config(args, work, args.variant, gc)
        timer = StepTimer()
        trainer, non_embedding, trainable = build_variant(args, cfg, timer)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
        stamps = timer.stamps[args.warmup:]
        step_s = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
        arch = cfg.model.arch
        tokens = args.batch_size * args.seq_len
        flops = tokens * (6 * non_embedding
                          + 12 * arch.num_hidden_layers * arch.hidden_size * args.seq_len)
        return {"deepspeed": args.variant, "gc": gc, "step_s": step_s,
                "tokens_per_s": tokens / step_s, "peak_mem_gib": peak_memory_gib(),
                "mfu": flops / step_s / (args.peak_tflops * 1e12),
                "non_embedding_params": non_embedding, "trainable_params": trainable,
                "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                "engine": type(trainer.model_wrapped).__name__}


def peak_memory_gib() -> float:
    """GPU: the allocator's peak. CPU: the process's peak resident set size."""
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def launch_variant(args, deepspeed: str, gc: bool, work: str) -> dict:
    """Run one variant in a fresh process; its result, or its error's last line."""
    out = os.path.join(work, f"{deepspeed}-{int(gc)}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--variant", deepspeed, "--gc", str(int(gc)),
           "--json-out", out, "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
           "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--num-labels", str(args.num_labels), "--peak-tflops", str(args.peak_tflops)]
    proc = subprocess.run(cmd + (["--tiny"] if args.tiny else []), capture_output=True,
                          text=True)
    if proc.returncode == 0 and os.path.isfile(out):
        with open(out) as fh:
            return json.load(fh)
    # The exception line: the last unindented one (Hydra/OmegaConf add indented detail lines).
    tail = [line for line in proc.stderr.splitlines() if line.strip() and not line[0].isspace()
            ][-1:] or ["?"]
    return {"deepspeed": deepspeed, "gc": gc, "error": f"exit {proc.returncode}: {tail[0][:150]}"}


def format_table(args, results) -> str:
    mem = "peak GPU GiB" if not args.tiny else "peak RSS GiB"
    shape = "tiny qwen2, fp32, CPU" if args.tiny else "Qwen2-0.5B shape, bf16"
    first = next((r for r in results if "error" not in r), {})
    lines = ["", f"gpu bench: {shape}, LoRA seq-cls, seq {args.seq_len}, batch {args.batch_size}, "
             f"{args.steps} steps ({args.warmup} warmup), device {first.get('device', '?')}, "
             f"MFU vs {args.peak_tflops:g} TFLOP/s",
             f"  non-embedding params {first.get('non_embedding_params', 0):,}, "
             f"trainable {first.get('trainable_params', 0):,}",
             f"  {'deepspeed':<10}{'grad ckpt':<11}{'tokens/s':>11}{'step s':>9}"
             f"{mem:>15}{'MFU':>8}  engine"]
    for r in results:
        gc = "yes" if r["gc"] else "no"
        if "error" in r or "skipped" in r:
            lines.append(f"  {r['deepspeed']:<10}{gc:<11}  {r.get('error') or r['skipped']}")
            continue
        lines.append(f"  {r['deepspeed']:<10}{gc:<11}{r['tokens_per_s']:>11.0f}{r['step_s']:>9.3f}"
                     f"{r['peak_mem_gib']:>15.2f}{100 * r['mfu']:>7.2f}%  {r['engine']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.variant:  # child process: one variant, result as JSON
        result = run_variant(args)
        with open(args.json_out, "w") as fh:
            json.dump(result, fh)
        return 0
    results = []
    with tempfile.TemporaryDirectory(prefix="lorasweep-gpu-bench-") as work:
        for deepspeed, gc in VARIANTS:
            if args.tiny and (deepspeed, gc) in TINY_SKIPPED:
                results.append({"deepspeed": deepspeed, "gc": gc,
                                "skipped": "skipped under --tiny (slow ZeRO start-up on CPU)"})
                continue
            print(f"gpu bench: deepspeed={deepspeed} gradient_checkpointing={gc} ...",
                  flush=True)
            results.append(launch_variant(args, deepspeed, gc, work))
    print(format_table(args, results), flush=True)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
