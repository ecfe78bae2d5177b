"""`hydra/launcher=slurm` (conf/hydra/launcher/slurm.yaml): Hydra finds its launchers among the
modules under `hydra_plugins`, so lorasweep's (lorasweep.cli.slurm) is named here, where
hydra-submitit-launcher, which it extends, is installed."""

from importlib.util import find_spec

if find_spec("hydra_plugins.hydra_submitit_launcher") is not None:
    from lorasweep.cli.slurm import SlurmLauncher

    __all__ = ["SlurmLauncher"]
