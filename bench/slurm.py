"""What a Slurm job costs a sweep trial: the same sweep with the local launchers and with
hydra/launcher=slurm, side by side in one run, seconds per trial.

    python bench/slurm.py              # 3 rounds of 2 tiny trials per launcher, on a one-node
                                       # Slurm cluster started on loopback (tests/slurm_cluster.py:
                                       # root, Debian's slurm-wlm, slurmdbd, munge, mariadb-server)
    python bench/slurm.py --tiny       # 1 round
    python bench/slurm.py --existing   # the cluster SLURM_CONF (or the default) points at

Each round runs one sweep per launcher, the launchers' order rotating from round to round (a
machine whose load changes during the bench weighs on each alike). Each sweep runs the same
trials (tiny_bert smoke runs, same sampler seed, a study file of its own) with the basic launcher
(trials in the sweeper's process), joblib (a worker process it reuses) and Slurm (each trial a
job: sbatch, a fresh Python on the node, submitit's pickles, sacct polling). Per trial: the sweep
loop's wall time (from the sweeper's start line to its summary line, so the sweeper's own
start-up is left out), the time inside the trial (Hydra's job start to end, from trial.json),
and the rest: what launching and collecting the trial cost.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, fill_defaults

TRIAL = ["model=tiny_bert", "training=smoke", "tracking=none", "baseline=none",
         "model.head_init=random", "hydra/sweeper/pruner=none"]
LAUNCHERS = {
    "basic": [],
    "joblib": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=1"],
    # the config's defaults are a GPU node's; one core and 2 GB fit any node
    "slurm": ["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=null",
              "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2",
              "hydra.launcher.timeout_min=10"],
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=2, help="trials per sweep")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--existing", action="store_true",
                        help="use the Slurm cluster SLURM_CONF points at; start none")
    parser.add_argument("--tiny", action="store_true", help="1 round")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every sweep")
    return fill_defaults(parser.parse_args(argv), {"rounds": 1}, {"rounds": 3})


def timed_sweep(launcher: str, trials: int, sweep_dir: Path, work: Path, env: dict,
                overrides) -> dict:
    """One sweep; the seconds its trial loop took and the trials' own seconds, in all."""
    cmd = [sys.executable, str(ROOT / "src" / "lorasweep" / "train.py"), "-m",
           "hparams_search=optuna_f1", f"hydra.sweeper.n_trials={trials}", *TRIAL,
           *LAUNCHERS[launcher], *overrides, f"data.cache_dir={work}/cache",
           f"hydra.sweep.dir={sweep_dir}", f"hydra.sweeper.storage={sweep_dir}/study.journal"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    marks, tail = [], []
    for line in proc.stdout:  # "lorasweep: study ..." opens the trial loop, and closes it
        if line.startswith("lorasweep: study "):
            marks.append(time.perf_counter())
        tail = [*tail[-40:], line]
    if proc.wait() != 0 or len(marks) != 2:
        raise SystemExit(f"{launcher} sweep failed:\n{''.join(tail)}")
    records = [json.loads(p.read_text()) for p in sweep_dir.glob("*/trial.json")]
    if len(records) != trials or any(r["status"] != "COMPLETE" for r in records):
        raise SystemExit(f"{launcher}: {[r['status'] for r in records]} (expected "
                         f"{trials} complete trials)")
    return {"loop": marks[1] - marks[0], "inside": sum(r["duration_s"] for r in records)}


def run(args, env: dict, work: Path) -> None:
    # a first sweep fills the data cache and the OS's file cache for all of them
    timed_sweep("basic", 1, work / "warm-up", work, env, args.overrides)
    names = list(LAUNCHERS)
    totals = {name: {"loop": 0.0, "inside": 0.0} for name in names}
    for round_ in range(args.rounds):
        for name in names[round_ % 3:] + names[:round_ % 3]:
            seconds = timed_sweep(name, args.trials, work / f"{name}-{round_}", work, env,
                                  args.overrides)
            for key in totals[name]:
                totals[name][key] += seconds[key]
    trials = args.trials * args.rounds
    rows = {name: {k: v / trials for k, v in total.items()} for name, total in totals.items()}
    print(f"\nslurm bench: {args.rounds} round(s) of {args.trials} tiny trials per launcher, "
          f"seconds per trial (loop: the sweep's wall time per trial; inside: the trial's own "
          f"run; launch: the rest)")
    print(f"  {'launcher':<10}{'loop s':>9}{'inside s':>10}{'launch s':>10}{'loop vs basic':>15}")
    for name, r in rows.items():
        print(f"  {name:<10}{r['loop']:>9.1f}{r['inside']:>10.1f}{r['loop'] - r['inside']:>10.1f}"
              f"{r['loop'] / rows['basic']['loop']:>14.2f}x")
    launch = {name: r["loop"] - r["inside"] for name, r in rows.items()}
    print(f"  launching and collecting a trial: Slurm {launch['slurm']:.1f} s, joblib "
          f"{launch['joblib']:.1f} s, basic {launch['basic']:.1f} s; a Slurm trial's loop time "
          f"{rows['slurm']['loop'] / rows['joblib']['loop']:.2f}x joblib's")


def main(argv=None) -> None:
    args = parse_args(argv)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryDirectory(prefix="lorasweep-bench-slurm-") as tmp:
        work = Path(tmp)
        if args.existing:
            run(args, env, work)
            return
        sys.path.insert(0, str(ROOT / "tests"))
        import slurm_cluster

        try:
            env.update(slurm_cluster.start(work / "cluster"))
        except slurm_cluster.ClusterUnavailable as exc:
            raise SystemExit(f"no Slurm cluster: {exc}") from None
        try:
            run(args, env, work)
        finally:
            slurm_cluster.stop(work / "cluster")


if __name__ == "__main__":
    main()
