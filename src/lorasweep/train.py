"""Train one sequence classifier with LoRA; return the objective for Optuna.

    python src/lorasweep/train.py model=tiny_bert training=smoke
    deepspeed --num_gpus 2 src/lorasweep/train.py deepspeed=zero3 lora.r=16
    python src/lorasweep/train.py -m hparams_search=optuna_f1
"""

import os
import sys

if __package__ in (None, ""):
    # Run as a script: make the `lorasweep` package importable, and keep this directory off
    # sys.path so none of our module names (data, metrics, ...) shadows another package.
    _src = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path[0] = _src

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from lorasweep.config import CONF_DIR  # noqa: E402  (importing it registers the schemas)
from lorasweep.distributed import (agree_on_run_dir, destroy_process_group,  # noqa: E402
                                   launched, strip_local_rank_arg)
from lorasweep.errors import (UserError, exit_2_on_user_error,  # noqa: E402
                              exit_with_user_error, run_cli)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float:
    return exit_2_on_user_error(train, cfg)


def train(cfg: DictConfig) -> float:
    """One run (in this process, or on N ranks through a launcher); the objective's value."""
    hydra_cfg = HydraConfig.get() if HydraConfig.initialized() else None
    # Before torch, transformers and the launcher are imported: a bad value is reported in
    # about 3 s instead of 10, and no launcher (no rank) starts for it.
    check_config(cfg, hydra_cfg)

    from lorasweep.launcher import placement_for, run_launched
    from lorasweep.pipeline import objective_value, run

    overrides = tuple(hydra_cfg.overrides.task) if hydra_cfg else ()
    nproc = cfg.distributed.nproc_per_node
    placement = None if launched() else placement_for(hydra_cfg, nproc)
    if placement is not None and (nproc > 1 or placement.own_process):
        metrics = run_launched(cfg.distributed.launcher, nproc, overrides, cfg.output_dir,
                               placement, cfg.tracking.secret_keys)
    else:
        if placement is not None and placement.threads:
            import torch

            torch.set_num_threads(placement.threads)  # this trial's share of the cores
        metrics = run(cfg, overrides=overrides)
    return objective_value(metrics, cfg.objective.metric)


def check_config(cfg: DictConfig, hydra_cfg) -> None:
    """A bad config: one line here, before any import of the training stack or any launcher.
    A sweep trial stopped by it still gets its FAILED MLflow run with the reason."""
    from lorasweep.preflight import check_run_config

    try:
        check_run_config(cfg)
    except UserError as exc:
        if hydra_cfg is not None and hydra_cfg.mode == RunMode.MULTIRUN:
            from lorasweep.tracking import record_failed_run

            record_failed_run(cfg, exc)
        raise


def resolve_run_dir() -> str:
    """`hydra.run.dir` resolved once (rank 0 of a launched run), timestamps included."""
    from hydra import compose, initialize_config_dir

    overrides = [a for a in sys.argv[1:] if not a.startswith("-")]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
        return str(cfg.hydra.run.dir)


def refuse_sweep_inside_launcher(argv) -> None:
    """A sweeper in every rank would sample different parameters per rank."""
    if launched() and any(a in ("-m", "--multirun") for a in argv):
        exit_with_user_error(UserError(
            "a sweep (-m) cannot run inside the deepspeed/torchrun launcher: every rank would "
            "sample its own parameters. Run the sweep in one process and let each trial launch "
            "its ranks: python src/lorasweep/train.py -m ... distributed.nproc_per_node=N"))


def cli() -> None:
    argv = strip_local_rank_arg(sys.argv)
    refuse_sweep_inside_launcher(argv)
    sys.argv = agree_on_run_dir(argv, resolve_run_dir)
    try:
        run_cli(main)
    finally:
        destroy_process_group()


if __name__ == "__main__":
    cli()
