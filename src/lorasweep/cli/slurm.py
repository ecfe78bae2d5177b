"""`hydra/launcher=slurm`: hydra-submitit-launcher's SlurmLauncher (each sweep trial one Slurm job,
submitted by submitit), with two changes for a sweep that must outlive its jobs:

- A job that ends without a result (cancelled with `scancel`, killed at its time limit or for
  memory, lost with its node) comes back as a failed job, its reason naming the job and its
  Slurm state, and the sweep goes on. The plugin's own `launch` raises for it instead: the
  sweep stops, and the results of the batch's other jobs are lost.
- In the job, SIGTERM (what Slurm sends first when it cancels a job) raises as it does in a
  run started by hand, so the run ends its MLflow run and closes its files before Slurm's
  SIGKILL (KillWait seconds later) instead of being ignored by submitit's handler.

submitit learns that a job ended from `sacct`: on a cluster without accounting
(AccountingStorageType=accounting_storage/slurmdbd) a job that ends without a result is never
seen to end, and its sweep waits for it forever.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import (
    SlurmLauncher as SubmititSlurmLauncher,
)
from omegaconf import OmegaConf

from lorasweep.interrupts import raise_on_sigterm

log = logging.getLogger(__name__)


class JobEndedWithoutResult(RuntimeError):
    """A Slurm job ended (cancelled, timed out, killed) before its trial returned."""


class SlurmLauncher(SubmititSlurmLauncher):
    def __call__(self, *args: Any, **kwargs: Any) -> JobReturn:
        raise_on_sigterm()  # in the job: replaces submitit's handler, which ignores SIGTERM
        return super().__call__(*args, **kwargs)

    def launch(self, job_overrides: Sequence[Sequence[str]],
               initial_job_idx: int) -> Sequence[JobReturn]:
        """Submit one job per overrides list and wait for all of them: the plugin's own
        `launch` (hydra-submitit-launcher 1.4.0rc3), except that a job without a result is a
        failed JobReturn."""
        executor = self._executor()
        log.info(f"Submitit '{self._EXECUTOR}' sweep output dir : {self.config.hydra.sweep.dir}")
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        job_params = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            job_params.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}",
                               Singleton.get_state()))
        jobs = executor.map_array(self, *zip(*job_params, strict=True))
        return [job_return(job, overrides) for job, overrides in zip(jobs, job_overrides,
                                                                       strict=True)]

    def _executor(self):
        """submitit's executor with this launcher's parameters (as the plugin builds it)."""
        import submitit

        specific = {"max_num_timeout", "python"}
        init = {"folder": self.params["submitit_folder"],
                **{f"{self._EXECUTOR}_{k}": v for k, v in self.params.items() if k in specific}}
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init)
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{
            k if k in base else f"{self._EXECUTOR}_{k}": v for k, v in self.params.items()
            if k not in specific | {"submitit_folder"}})
        return executor


def job_return(job, overrides: Sequence[str]) -> JobReturn:
    """The job's JobReturn; a failed one when the job ended without a result."""
    from submitit.core.utils import UncompletedJobError

    try:
        return job.results()[0]
    except UncompletedJobError:
        reason = (f"Slurm job {job.job_id} ended {job.state} without a result; its log: "
                  f"{job.paths.stderr}")
        log.warning(reason)
        return JobReturn(overrides=list(overrides), status=JobStatus.FAILED,
                         _return_value=JobEndedWithoutResult(reason))
