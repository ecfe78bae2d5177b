"""Run one training on N ranks from a single process: `distributed.nproc_per_node=N`.

An Optuna sweep must sample in ONE process (a sweeper inside every rank samples different
parameters per rank: lightning-hydra-template #639, transformers #18609). So the sweeper process
starts `deepspeed` (or `torchrun`) as a child with the trial's overrides and run dir, waits, and
reads the objective back from the run dir's metrics.json. Plain `python train.py
distributed.nproc_per_node=2` uses the same path.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from typing import Dict, List, Sequence

from lorasweep import outputs

log = logging.getLogger(__name__)

TRAIN_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")


def launcher_command(launcher: str, nproc: int, overrides: Sequence[str], run_dir: str) -> List[str]:
    # The child trains once on N ranks in this job's run dir; it must not spawn again.
    # hydra.mode=RUN: an overlay such as hparams_search=... would otherwise make it sweep again.
    args = [a for a in overrides if not a.startswith(("hydra.run.dir=", "hydra.mode=",
                                                      "distributed.nproc_per_node="))]
    args += [f"hydra.run.dir={run_dir}", "hydra.mode=RUN", "distributed.nproc_per_node=1"]
    if launcher == "torchrun":
        head = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_port", str(_free_port())]
    else:
        head = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
                "--master_port", str(_free_port())]
    return [*head, TRAIN_SCRIPT, *args]


def _free_port() -> int:
    from lorasweep.distributed import free_port

    return free_port()


def run_launched(launcher: str, nproc: int, overrides: Sequence[str], run_dir: str) -> Dict:
    """Train on `nproc` ranks in a child launcher; return the metrics it wrote.

    The child gets its own process group (session); if this process is interrupted, or the
    child fails, the whole group is killed, so no orphaned rank keeps running.
    """
    os.makedirs(run_dir, exist_ok=True)
    cmd = launcher_command(launcher, nproc, overrides, run_dir)
    log.info("launching %d ranks: %s", nproc, " ".join(cmd))
    proc = subprocess.Popen(cmd, start_new_session=True)
    try:
        code = proc.wait()
    except BaseException:
        _kill_group(proc)
        raise
    _kill_group(proc)  # reap any rank the launcher left behind
    metrics_path = os.path.join(run_dir, outputs.METRICS)
    if code != 0 or not os.path.isfile(metrics_path):
        raise RuntimeError(f"the {launcher} launcher exited with code {code} for run dir "
                           f"{run_dir} (see its train.log)")
    return outputs.read_json(run_dir, outputs.METRICS)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
