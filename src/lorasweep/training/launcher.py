"""Run one training on N ranks from a single process: `distributed.nproc_per_node=N`.

An Optuna sweep must sample in ONE process (a sweeper inside every rank samples different
parameters per rank: lightning-hydra-template #639, transformers #18609). So the sweeper process
starts `deepspeed` (or `torchrun`) as a child with the trial's overrides and run dir, running the
module `lorasweep.train` (so it works wherever lorasweep is installed), waits, and reads the
objective back from the run dir's metrics.json. Plain `lorasweep-train
distributed.nproc_per_node=2` uses the same path.

Trials that run at once (`hydra/launcher=joblib`) are placed: on GPUs, each trial's ranks get
their own devices (slot i of a batch takes GPUs i*N .. i*N+N-1 of the visible ones); on CPU, each
trial gets an equal share of the cores as torch threads.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from lorasweep import outputs
from lorasweep.distributed import free_port
from lorasweep.errors import ConfigError
from lorasweep.redaction import mask_overrides

log = logging.getLogger(__name__)

TRAIN_MODULE = "lorasweep.train"


@dataclass
class Placement:
    """Where one trial runs: its GPUs (None on CPU), and torch threads per rank (None: all)."""

    gpus: list[str] | None = None
    threads: int | None = None
    # a GPU trial beside others runs in a fresh child process: CUDA_VISIBLE_DEVICES is read once,
    # when CUDA starts, and a joblib worker is reused from trial to trial
    own_process: bool = False

    def child_env(self) -> dict[str, str]:
        env = {}
        if self.gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(self.gpus)
        if self.threads is not None:
            env["OMP_NUM_THREADS"] = str(self.threads)
        return env


def visible_gpus() -> list[str] | None:
    """The GPUs this process may use, in CUDA_VISIBLE_DEVICES order; None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    listed = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    if listed.strip():
        return [d.strip() for d in listed.split(",") if d.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def trials_at_once(hydra_cfg) -> tuple[int, int | None]:
    """(trials running at once, the sweeper's batch size) for this job; (1, 1) outside a
    parallel sweep. Batches start at job numbers that are multiples of the batch size, so
    `job_num % batch` is unique among the trials that can run together."""
    from hydra.types import RunMode

    if hydra_cfg is None or hydra_cfg.mode != RunMode.MULTIRUN:
        return 1, 1
    launcher = hydra_cfg.launcher
    if "joblib" not in str(launcher.get("_target_", "")):
        return 1, 1
    n_jobs = int(launcher.get("n_jobs") or 1)
    if n_jobs < 0:  # joblib: -1 = every core, -2 = all but one, ...
        n_jobs = max(1, (os.cpu_count() or 1) + 1 + n_jobs)
    sweeper = hydra_cfg.sweeper
    optuna = "optuna" in str(sweeper.get("_target_", ""))
    batch = sweeper.get("n_jobs") if optuna else sweeper.get("max_batch_size")
    return (min(n_jobs, batch) if batch else n_jobs), batch


def place_trial(job_num: int, at_once: int, batch: int | None, nproc: int,
                gpus: list[str] | None, cpus: int) -> Placement:
    """GPUs for slot `job_num % batch` (a batch of None: every job its own slot), or a share of
    the CPU threads. On GPUs the devices are always named, so the deepspeed launcher (which
    ignores CUDA_VISIBLE_DEVICES when given --num_gpus) uses the ones this process was given."""
    if gpus is None:
        return Placement(threads=max(1, cpus // (at_once * nproc)) if at_once > 1 else None)
    slot = 0 if at_once <= 1 else (job_num % batch if batch else job_num)
    first = slot * nproc
    if first + nproc > len(gpus):
        raise ConfigError(
            f"distributed.nproc_per_node={nproc}: trial slot {slot} needs GPUs {first}.."
            f"{first + nproc - 1} but {len(gpus)} are visible ({','.join(gpus)}); run fewer "
            "trials at once (hydra.sweeper.n_jobs, or hydra.sweeper.max_batch_size for a grid)")
    return Placement(gpus=gpus[first:first + nproc], own_process=at_once > 1)


def placement_for(hydra_cfg, nproc: int) -> Placement:
    """This job's placement (a plain run: all GPUs from the first, all threads)."""
    at_once, batch = trials_at_once(hydra_cfg)
    job_num = hydra_cfg.job.num if at_once > 1 else 0
    return place_trial(job_num, at_once, batch, nproc, visible_gpus(), os.cpu_count() or 1)


def config_arguments(hydra_cfg) -> list[str]:
    """The command-line flags that chose this job's config, for a child that composes it again:
    each `--config-dir` a user added, and `--config-name` unless it is the default `train`."""
    if hydra_cfg is None:
        return []
    args = []
    for source in hydra_cfg.runtime.config_sources:
        if source.provider == "command-line" and source.schema == "file":
            args += ["--config-dir", source.path]
    if hydra_cfg.job.config_name not in (None, "train"):
        args += ["--config-name", hydra_cfg.job.config_name]
    return args


def launcher_command(launcher: str, nproc: int, overrides: Sequence[str], run_dir: str,
                     gpus: list[str] | None = None,
                     config_args: Sequence[str] = ()) -> list[str]:
    # The child trains once on N ranks in this job's run dir; it must not spawn again.
    # hydra.mode=RUN: an overlay such as hparams_search=... would otherwise make it sweep again.
    args = [a for a in overrides if not a.startswith(("hydra.run.dir=", "hydra.mode=",
                                                      "distributed.nproc_per_node="))]
    args += [f"hydra.run.dir={run_dir}", "hydra.mode=RUN", "distributed.nproc_per_node=1"]
    port = ["--master_port", str(free_port())]
    if launcher == "torchrun":  # honours CUDA_VISIBLE_DEVICES (set by run_launched)
        head = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                *port, "-m"]
    elif gpus:
        head = [sys.executable, "-m", "deepspeed.launcher.runner", "--include",
                f"localhost:{','.join(gpus)}", *port, "--module"]
    else:
        head = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
                *port, "--module"]
    return [*head, TRAIN_MODULE, *config_args, *args]


def run_launched(launcher: str, nproc: int, overrides: Sequence[str], run_dir: str,
                 placement: Placement | None = None, secret_keys: Sequence[str] = (),
                 config_args: Sequence[str] = ()) -> dict:
    """Train on `nproc` ranks in a child launcher; return the metrics it wrote. `secret_keys`
    (tracking.secret_keys) mask the command in the log, which goes to the run dir's train.log;
    `config_args`: the `config_arguments` the child composes its config with.

    The child gets its own process group (session); if this process is interrupted, the group
    gets SIGTERM (rank 0 then ends its MLflow run KILLED), and whatever is left after a grace
    period is killed, as it is when the child fails: no orphaned rank keeps running.
    """
    placement = placement or Placement()
    os.makedirs(run_dir, exist_ok=True)
    cmd = launcher_command(launcher, nproc, overrides, run_dir, placement.gpus, config_args)
    log.info("launching %d ranks%s: %s", nproc,
             f" on GPUs {','.join(placement.gpus)}" if placement.gpus else "",
             " ".join(mask_overrides(cmd, secret_keys)))
    proc = subprocess.Popen(cmd, start_new_session=True, env={**os.environ,
                                                              **placement.child_env()})
    try:
        code = proc.wait()
    except BaseException:
        _stop_group(proc)
        raise
    _kill_group(proc)  # reap any rank the launcher left behind
    if os.path.isfile(os.path.join(run_dir, outputs.PRUNED)):  # its ranks stopped on the pruner
        import optuna

        raise optuna.TrialPruned(outputs.read_json(run_dir, outputs.PRUNED)["reason"])
    metrics_path = os.path.join(run_dir, outputs.METRICS)
    if code != 0 or not os.path.isfile(metrics_path):
        raise RuntimeError(f"the {launcher} launcher exited with code {code} for run dir "
                           f"{run_dir} (see its train.log)")
    return outputs.read_json(run_dir, outputs.METRICS)


def _stop_group(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    _kill_group(proc)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
