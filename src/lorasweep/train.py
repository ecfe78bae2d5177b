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
from omegaconf import DictConfig  # noqa: E402

from lorasweep import config as _config  # noqa: E402,F401  (registers the schemas)
from lorasweep.distributed import strip_local_rank_arg  # noqa: E402
from lorasweep.errors import run_cli  # noqa: E402

CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "conf")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float:
    from lorasweep.pipeline import objective_value, run

    metrics = run(cfg, overrides=tuple(HydraConfig.get().overrides.task))
    return objective_value(metrics, cfg.objective.metric)


def cli() -> None:
    sys.argv = strip_local_rank_arg(sys.argv)
    run_cli(main)


if __name__ == "__main__":
    cli()
