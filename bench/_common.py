"""What every bench script shares: the repo root with `src/` importable, offline settings, the
real config tree composed as train.py composes it, and --tiny / full-size argument defaults."""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def compose_train(overrides):
    """conf/train.yaml with `overrides` (the schemas registered, as train.py does)."""
    from hydra import compose, initialize_config_dir

    from lorasweep import config as _config  # noqa: F401  (registers the schemas conf/ uses)

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def fill_defaults(args, tiny: dict, full: dict):
    """Arguments left unset take the --tiny default or the full-size one."""
    for key, value in (tiny if args.tiny else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args
