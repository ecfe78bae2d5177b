"""What every bench script shares: the repo root, offline settings, the real config tree composed
as train.py composes it, and --tiny / full-size argument defaults. lorasweep must be installed
(`make install`: the clone's own code, editable)."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def compose_train(overrides):
    """conf/train.yaml with `overrides` (the schemas registered, as train.py does)."""
    from hydra import compose, initialize_config_dir

    from lorasweep.config import CONF_DIR  # importing it registers the schemas conf/ uses

    with initialize_config_dir(config_dir=CONF_DIR):
        return compose(config_name="train", overrides=list(overrides))


def fill_defaults(args, tiny: dict, full: dict):
    """Arguments left unset take the --tiny default or the full-size one."""
    for key, value in (tiny if args.tiny else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args
