"""Two nodes, one training, on this machine: one launcher process per node, as on a real
cluster (`deepspeed --no_ssh --node_rank R`, `torchrun --nnodes 2 --node_rank R`), one rank per
node, rendezvous on loopback. What a 2-node job gets wrong first: LOCAL_RANK is 0 on both nodes
(only global rank 0 may write files or log to MLflow), each node's data cache (node-local or
shared), and a node that dies mid-run (a restart of both resumes from the last checkpoint)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from helpers import ROOT, TRAIN, assert_reload_reproduces_predictions, cli_env
from lorasweep.distributed import free_port

pytestmark = pytest.mark.slow

TINY = ["model=tiny_bert", "training=smoke", "baseline=none"]


def node_command(launcher: str, node_rank: int, port: int, hostfile: Path,
                 overrides: list[str]) -> list[str]:
    """The per-node command a user runs on node `node_rank` (README: Multi-GPU and multi-node)."""
    if launcher == "deepspeed":
        head = ["deepspeed", "--no_ssh", "--hostfile", str(hostfile), "--num_nodes", "2",
                "--node_rank", str(node_rank), "--master_addr", "127.0.0.1", "--master_port",
                str(port), "--num_gpus", "1"]
    else:
        head = ["torchrun", "--nnodes", "2", "--node_rank", str(node_rank), "--nproc_per_node",
                "1", "--master_addr", "127.0.0.1", "--master_port", str(port)]
    return [*head, str(TRAIN), *overrides]


def start_nodes(launcher: str, tmp_path: Path, overrides, per_node=lambda rank: [],
                tag: str = "run") -> list[subprocess.Popen]:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = free_port()
    procs = []
    for rank in (0, 1):
        log = open(tmp_path / f"{tag}-node{rank}.log", "w")
        procs.append(subprocess.Popen(
            node_command(launcher, rank, port, hostfile, [*overrides, *per_node(rank)]),
            cwd=ROOT, env=cli_env(), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True))
    return procs


def wait_nodes(procs, tmp_path: Path, tag: str = "run", timeout: float = 600) -> None:
    deadline = time.time() + timeout
    for proc in procs:
        proc.wait(timeout=max(1, deadline - time.time()))
    logs = [(tmp_path / f"{tag}-node{r}.log").read_text() for r in (0, 1)]
    assert [p.returncode for p in procs] == [0, 0], "\n\n".join(x[-4000:] for x in logs)


def test_two_deepspeed_nodes_train_one_zero3_run_with_node_local_caches(tmp_path):
    run = tmp_path / "run"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    procs = start_nodes("deepspeed", tmp_path,
                        [*TINY, "deepspeed=zero3", f"hydra.run.dir={run}", f"tracking.uri={uri}",
                         "tracking.experiment_name=two_nodes"],
                        per_node=lambda rank: [f"data.cache_dir={tmp_path / f'node{rank}'}"])
    wait_nodes(procs, tmp_path)
    meta = json.loads((run / "model_metadata.json").read_text())
    assert meta["world_size"] == 2 and meta["wrapped_model_class"] == "DeepSpeedEngine"
    assert meta["zero_stage_engine"] == 3
    # LOCAL_RANK is 0 on both nodes: still one writer (global rank 0), one MLflow run
    log = (run / "train.log").read_text()
    assert "[rank0]" in log and "[rank1]" not in log
    client = MlflowClient(uri)
    [logged] = client.search_runs([client.get_experiment_by_name("two_nodes").experiment_id])
    assert logged.info.status == "FINISHED" and logged.data.tags["world_size"] == "2"
    # node-local caches: each node prepared (or would load) its own
    for rank in (0, 1):
        assert list((tmp_path / f"node{rank}" / "prepared").iterdir()), f"node {rank}: no cache"
    assert (run / "adapter" / "adapter_model.safetensors").stat().st_size > 1000
    assert_reload_reproduces_predictions(run)


def test_a_dead_node_and_a_restart_of_both_resume_from_the_last_checkpoint(tmp_path):
    """torchrun, one shared cache: node 1's process is SIGKILLed after the first checkpoint,
    node 0's job ends with it (it would wait for its peer until the collective's timeout); both
    restarted with the same command resume from the newest complete checkpoint and finish."""
    run = tmp_path / "run"
    # 200 steps: the first checkpoint (step 10) comes long before the end, even on a busy machine
    args = [*TINY, "tracking=none", "training.max_steps=200", "training.save_strategy=steps",
            "training.save_steps=10", "training.save_total_limit=2", f"hydra.run.dir={run}",
            f"data.cache_dir={tmp_path / 'shared'}"]
    first = start_nodes("torchrun", tmp_path, args, tag="first")
    deadline = time.time() + 300
    while not any((p / "trainer_state.json").is_file()
                  for p in (run / "checkpoints").glob("checkpoint-*")):
        assert time.time() < deadline and first[1].poll() is None, "no checkpoint appeared"
        time.sleep(0.1)
    os.killpg(first[1].pid, signal.SIGKILL)  # node 1: its launcher and its rank
    first[1].wait()
    try:  # node 0 waits for its peer at the next collective: its job is killed too
        first[0].wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(first[0].pid, signal.SIGKILL)
        first[0].wait()
    assert not (run / "metrics.json").exists(), "the run finished before a node was killed"
    saved = max(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("checkpoint-*")
                if (p / "trainer_state.json").is_file())

    wait_nodes(start_nodes("torchrun", tmp_path, args, tag="second"), tmp_path, tag="second")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["resumed_from_step"] >= saved >= 10
    meta = json.loads((run / "model_metadata.json").read_text())
    assert meta["global_step"] == 200 and meta["world_size"] == 2
    assert len(list((tmp_path / "shared" / "prepared").iterdir())) == 1  # one entry, shared
