"""Train one sequence classifier with LoRA; return the objective for Optuna.

    lorasweep-train model=tiny_bert training=smoke       (or python -m lorasweep.train ...)
    python src/lorasweep/train.py model=tiny_bert training=smoke
    deepspeed --num_gpus 2 src/lorasweep/train.py deepspeed=zero3 lora.r=16
    deepspeed --num_gpus 2 --module lorasweep.train deepspeed=zero3 lora.r=16
    python src/lorasweep/train.py -m hparams_search=optuna_f1
"""

import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from lorasweep.cli.harness import exit_2_on_user_error, exit_with_user_error, run_cli
from lorasweep.config import CONF_DIR, EXECUTION_WHITELIST, check_run_config
from lorasweep.distributed import (
    agree_on_run_dir,
    destroy_process_group,
    launched,
    strip_local_rank_arg,
)
from lorasweep.errors import UserError


@hydra.main(config_path=CONF_DIR, config_name="train", execution_whitelist=EXECUTION_WHITELIST)
def main(cfg: DictConfig) -> float:
    return exit_2_on_user_error(train, cfg)


def train(cfg: DictConfig) -> float:
    """One run (in this process, or on N ranks through a launcher); the objective's value."""
    hydra_cfg = HydraConfig.get() if HydraConfig.initialized() else None
    # Before torch, transformers and the launcher are imported: a bad value is reported in
    # about 3 s instead of 10, and no launcher (no rank) starts for it.
    check_config(cfg, hydra_cfg)

    from lorasweep.training.launcher import config_arguments, placement_for, run_launched
    from lorasweep.training.pipeline import objective_value, run

    overrides = tuple(hydra_cfg.overrides.task) if hydra_cfg else ()
    nproc = cfg.distributed.nproc_per_node
    placement = None if launched() else placement_for(hydra_cfg, nproc)
    if placement is not None and (nproc > 1 or placement.own_process):
        metrics = run_launched(cfg.distributed.launcher, nproc, overrides, cfg.output_dir,
                               placement, cfg.tracking.secret_keys, config_arguments(hydra_cfg))
    else:
        if placement is not None and placement.threads:
            import torch

            torch.set_num_threads(placement.threads)  # this trial's share of the cores
        metrics = run(cfg, overrides=overrides, check=False)  # checked above
    return objective_value(metrics, cfg.objective.metric)


def check_config(cfg: DictConfig, hydra_cfg) -> None:
    """A bad config: one line here, before any import of the training stack or any launcher.
    A sweep trial stopped by it still gets its FAILED MLflow run with the reason."""
    try:
        check_run_config(cfg)
    except UserError as exc:
        if hydra_cfg is not None and hydra_cfg.mode == RunMode.MULTIRUN:
            from lorasweep.tracking.tracker import record_failed_run

            record_failed_run(cfg, exc)
        raise


def resolve_run_dir(argv) -> str:
    """`hydra.run.dir` resolved once (rank 0 of a launched run), timestamps included, from the
    command line as Hydra reads it (a user's --config-dir and --config-name included)."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.utils import get_args_parser

    args = get_args_parser().parse_args(argv[1:])
    overrides = list(args.overrides)
    if args.config_dir:
        overrides.append(f"hydra.searchpath=[file://{os.path.abspath(args.config_dir)}]")
    with initialize_config_dir(config_dir=CONF_DIR):
        cfg = compose(config_name=args.config_name or "train", overrides=overrides,
                      return_hydra_config=True)
        return str(cfg.hydra.run.dir)


def refuse_sweep_inside_launcher(argv) -> None:
    """A sweeper in every rank would sample different parameters per rank."""
    if launched() and any(a in ("-m", "--multirun") for a in argv):
        exit_with_user_error(UserError(
            "a sweep (-m) cannot run inside the deepspeed/torchrun launcher: every rank would "
            "sample its own parameters. Run the sweep in one process and let each trial launch "
            "its ranks: lorasweep-train -m ... distributed.nproc_per_node=N"))


def cli() -> None:
    argv = strip_local_rank_arg(sys.argv)
    refuse_sweep_inside_launcher(argv)
    sys.argv = agree_on_run_dir(argv, lambda: resolve_run_dir(argv))
    try:
        run_cli(main)
    finally:
        destroy_process_group()


if __name__ == "__main__":
    cli()
