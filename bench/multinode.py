"""Two nodes against one: the same 2-rank training (same data, config and seed) started as one
node with two ranks and as two nodes with one rank each (two launcher processes on this machine,
rendezvous on loopback), side by side in one run.

    python bench/multinode.py                      # tiny_bert, ZeRO-3, 60 steps
    python bench/multinode.py --launcher torchrun --deepspeed none
    python bench/multinode.py --model minilm --steps 100

Prints, for each layout: the final metrics (they must agree to float tolerance: the same ranks
see the same batches), the wall time from the first launcher's start to the last one's exit,
the training time the Trainer measured, and what is left, the launch, rendezvous and start-up
overhead; then the two-node / one-node ratio of each.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT

TRAIN = ROOT / "src" / "lorasweep" / "train.py"
COMPARED = ("eval_f1_macro", "eval_accuracy", "eval_loss", "test_loss")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launcher", choices=("deepspeed", "torchrun"), default="deepspeed")
    parser.add_argument("--deepspeed", default="zero3", help="the deepspeed group (none: DDP)")
    parser.add_argument("--model", default="tiny_bert")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2,
                        help="runs of each layout, in alternating order; the fastest is shown")
    return parser.parse_args(argv)


def launcher_head(args, port: int, nodes: int, node_rank: int, hostfile: Path) -> list[str]:
    ranks = "2" if nodes == 1 else "1"
    if args.launcher == "deepspeed":
        head = ["deepspeed", "--master_addr", "127.0.0.1", "--master_port", str(port),
                "--num_gpus", ranks]
        if nodes == 2:
            head[1:1] = ["--no_ssh", "--hostfile", str(hostfile), "--num_nodes", "2",
                         "--node_rank", str(node_rank)]
        return head
    return ["torchrun", "--nnodes", str(nodes), "--node_rank", str(node_rank),
            "--nproc_per_node", ranks, "--master_addr", "127.0.0.1", "--master_port", str(port)]


def run_layout(args, nodes: int, work: Path, round_: int) -> dict:
    from lorasweep.distributed import free_port

    run = work / f"{nodes}-node-{round_}"
    hostfile = work / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    overrides = [f"model={args.model}", "training=smoke", f"training.max_steps={args.steps}",
                 "training.eval_strategy=no", "baseline=none", "tracking=none",
                 f"deepspeed={args.deepspeed}", f"hydra.run.dir={run}",
                 f"data.cache_dir={work / 'cache'}"]
    port = free_port()
    started = time.perf_counter()
    procs = []
    for node_rank in range(nodes):
        log = open(work / f"{nodes}-node-{round_}-{node_rank}.log", "w")
        procs.append(subprocess.Popen(
            [*launcher_head(args, port, nodes, node_rank, hostfile), str(TRAIN), *overrides],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
    codes = [p.wait() for p in procs]
    wall = time.perf_counter() - started
    if codes != [0] * nodes:
        raise SystemExit(f"{nodes}-node run failed (exit codes {codes}); logs in {work}")
    metrics = json.loads((run / "metrics.json").read_text())
    meta = json.loads((run / "model_metadata.json").read_text())
    return {"nodes": nodes, "wall": wall, "train": metrics["train_runtime"],
            "world_size": meta["world_size"], "engine": meta["wrapped_model_class"],
            **{k: metrics[k] for k in COMPARED}}


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lorasweep-multinode-") as tmp:
        work = Path(tmp)
        # The cache first (prepared data, the random test model): neither layout pays for it.
        subprocess.run([sys.executable, str(TRAIN), f"model={args.model}", "training=smoke",
                        "training.max_steps=1", "training.eval_strategy=no", "baseline=none",
                        "tracking=none", f"hydra.run.dir={work / 'warm'}",
                        f"data.cache_dir={work / 'cache'}"], cwd=ROOT, check=True,
                       capture_output=True)
        results = {1: [], 2: []}
        for round_ in range(args.rounds):
            for nodes in ((1, 2) if round_ % 2 == 0 else (2, 1)):
                results[nodes].append(run_layout(args, nodes, work, round_))
        one, two = (min(results[n], key=lambda r: r["wall"]) for n in (1, 2))
    print(f"\nmulti-node bench: {args.model}, {args.steps} steps, {args.launcher}, "
          f"deepspeed={args.deepspeed}, world size 2 (the faster of {args.rounds} runs each, in "
          "alternating order)")
    print(f"  {'layout':<22}{'wall s':>9}{'train s':>9}{'overhead s':>12}"
          + "".join(f"{k:>15}" for k in COMPARED) + "  engine")
    for r in (one, two):
        label = "1 node x 2 ranks" if r["nodes"] == 1 else "2 nodes x 1 rank"
        print(f"  {label:<22}{r['wall']:>9.1f}{r['train']:>9.1f}{r['wall'] - r['train']:>12.1f}"
              + "".join(f"{r[k]:>15.6f}" for k in COMPARED) + f"  {r['engine']}")
    print(f"  two nodes / one node: wall {two['wall'] / one['wall']:.2f}x, training "
          f"{two['train'] / one['train']:.2f}x, overhead "
          f"{(two['wall'] - two['train']) - (one['wall'] - one['train']):+.1f} s")
    worst = max(abs(a[k] - b[k]) for k in COMPARED for a in results[1] for b in results[2])
    print(f"  largest metric difference between any two runs: {worst:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
