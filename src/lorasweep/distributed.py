"""Everything that knows about ranks. Nothing else in lorasweep reads RANK or WORLD_SIZE.

Launchers (`deepspeed`, `torchrun`) put RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT
in the environment; a plain `python train.py` has none of them and is rank 0 of a world of 1.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_rank_zero() -> bool:
    return rank() == 0


def is_local_rank_zero() -> bool:
    """The first rank on this node (on several nodes, LOCAL_RANK is 0 once per node)."""
    return local_rank() == 0


def launched() -> bool:
    """True when a launcher (deepspeed, torchrun) started this process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def strip_local_rank_arg(argv: list[str]) -> list[str]:
    """Drop the `--local_rank=N` the deepspeed launcher appends (Hydra's parser rejects it).

    The value is kept in LOCAL_RANK, where the launcher also puts it.
    """
    kept, skip_next = [], False
    for i, arg in enumerate(argv):
        if skip_next:
            skip_next = False
            continue
        if arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
        elif arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            skip_next = True
        else:
            kept.append(arg)
    return kept


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def set_single_rank_env() -> None:
    """Make a launcher-less process a rank-0-of-1 world, which DeepSpeed needs to initialise."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def prepare_backend(use_deepspeed: bool) -> dict:
    """Set up the process state the Trainer needs; return extra TrainingArguments kwargs.

    On CUDA, accelerate does everything. On a CPU-only machine it picks no backend: N launched
    ranks would each train alone (world_size 1) and DeepSpeed's batch-size check fails. There we
    create the accelerate state with gloo ourselves and tell the Trainer to use it: DeepSpeed
    then builds real ZeRO engines over gloo, and plain multi-rank runs train as DDP.
    """
    import torch

    if use_deepspeed and not launched():
        set_single_rank_env()  # DeepSpeed needs a process group even for one process
    if torch.cuda.is_available() or not (use_deepspeed or world_size() > 1):
        return {}
    from accelerate.state import PartialState

    if use_deepspeed:
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        PartialState(backend="gloo")
        return {"accelerator_config": {"use_configured_state": True}}
    PartialState(cpu=True, backend="gloo")  # multi-CPU DDP
    return {"use_cpu": True, "accelerator_config": {"use_configured_state": True}}


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@contextmanager
def rank_zero_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. fills a cache), then the others run it (cache hits).

    Collective: every rank must enter it, the same number of times, or the barriers pair up wrong.
    """
    if not is_rank_zero():
        barrier()
    try:
        yield
    finally:
        if is_rank_zero():
            barrier()


def configure_logging(log_all_ranks: bool, log_level: str = "info") -> None:
    """Ranks other than 0 log warnings and errors only, unless `log_all_ranks` is set."""
    import datasets
    import transformers

    quiet = not is_rank_zero() and not log_all_ranks
    level = logging.WARNING if quiet else getattr(logging, log_level.upper())
    logging.getLogger("lorasweep").setLevel(level)
    transformers.utils.logging.set_verbosity(logging.ERROR if quiet else logging.WARNING)
    datasets.utils.logging.set_verbosity(logging.ERROR if quiet else logging.WARNING)
    if quiet:
        datasets.disable_progress_bars()
    if world_size() > 1:
        for handler in logging.getLogger().handlers:
            if not isinstance(handler.formatter, RankFormatter):
                handler.setFormatter(RankFormatter(handler.formatter, rank()))


class RankFormatter(logging.Formatter):
    """Prefixes what another formatter writes with `[rankN] `, so interleaved lines tell apart."""

    def __init__(self, inner: logging.Formatter | None, rank_: int) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()
        self.prefix = f"[rank{rank_}] "

    def format(self, record: logging.LogRecord) -> str:
        return self.prefix + self.inner.format(record)


def destroy_process_group() -> None:
    if "torch.distributed" not in sys.modules:  # never started (a signal may have come mid-import)
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def init_launched_process_group() -> None:
    """Join the launcher's process group now (gloo on CPU, nccl on GPU) so ranks can agree on
    things before Hydra starts; accelerate and DeepSpeed reuse this group later."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank()))
    else:
        dist.init_process_group("gloo")


def broadcast_from_rank_zero(value):
    import torch.distributed as dist

    payload = [value if is_rank_zero() else None]
    dist.broadcast_object_list(payload, src=0)
    return payload[0]


def agree_on_run_dir(argv: list[str], resolve_run_dir) -> list[str]:
    """Give every rank the same Hydra run dir, and keep ranks > 0 from writing into it.

    Hydra's `${now:...}` resolves separately in each rank, which would give each rank its own dir
    (lightning-hydra-template #393). Rank 0 resolves the dir (`resolve_run_dir()`: the config's or
    the command's `hydra.run.dir`) and broadcasts it; every rank then runs with that literal dir.
    Ranks > 0 also get `hydra.output_subdir=null` (no .hydra/ copy) and log to stdout only.
    """
    if world_size() <= 1:
        return argv
    init_launched_process_group()
    chosen = broadcast_from_rank_zero(resolve_run_dir() if is_rank_zero() else None)
    kept = [a for a in argv if not a.startswith("hydra.run.dir=")]
    extra = [f"hydra.run.dir={chosen}"]
    if not is_rank_zero():
        extra += ["hydra.output_subdir=null", "hydra/job_logging=stdout"]
    return kept + extra
