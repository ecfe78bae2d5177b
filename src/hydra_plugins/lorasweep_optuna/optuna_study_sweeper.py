"""`hydra/sweeper=lorasweep_optuna`: hydra-optuna-sweeper's configuration and parts (sampler,
search space, launcher) with lorasweep's sweep loop (lorasweep.tracking.study): a durable study
that reruns continue and several sweepers share, and trials that report each evaluation to a
pruner (`hydra/sweeper/pruner=median|successive_halving|hyperband|none`).

Hydra imports every module under `hydra_plugins` when it looks for plugins, so this one stays
small: the loop is imported when a sweep starts.
"""

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
from omegaconf import MISSING


class LorasweepOptunaSweeper(OptunaSweeper):
    def __init__(self, pruner: Any = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pruner = pruner

    def sweep(self, arguments: list[str]) -> None:
        from lorasweep.tracking.study import run_sweep

        return run_sweep(self.sweeper, self.pruner, arguments)


@dataclass
class LorasweepOptunaSweeperConf(OptunaSweeperConf):
    _target_: str = (
        "hydra_plugins.lorasweep_optuna.optuna_study_sweeper.LorasweepOptunaSweeper")
    defaults: list[Any] = field(default_factory=lambda: [{"sampler": "tpe"}, {"pruner": "none"}])
    # optuna.pruners.* with its arguments: the hydra/sweeper/pruner options (MISSING here, so
    # the option chosen in the defaults list fills it)
    pruner: Any = MISSING


ConfigStore.instance().store(group="hydra/sweeper", name="lorasweep_optuna",
                             node=LorasweepOptunaSweeperConf, provider="lorasweep")
