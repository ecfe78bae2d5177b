"""Real multi-rank runs on CPU: the `deepspeed` launcher (ZeRO-2/3 engines over gloo) and
torchrun (DDP), one shared run dir written and one MLflow run logged by rank 0 only, a stale
DeepSpeed op build lock cleared, and kill + resume."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from helpers import (
    ROOT,
    SHM_OP,
    TRAIN,
    assert_reload_reproduces_predictions,
    cli_env,
    deepspeed_launcher,
    extensions_dir_with_stale_lock,
    run_train,
    torchrun_launcher,
)

pytestmark = pytest.mark.slow

RUN_FILES = {".hydra", "adapter", "checkpoints", "config.yaml", "dataset_metadata.json",
             "label_map.json", "metrics.json", "model_metadata.json", "reports",
             "run_complete.json", "tokenizer", "train.log"}


def launched_run(launcher, overrides, tmp_path, entry=(str(TRAIN),)):
    """Run 2 ranks with a timestamped run dir pattern; the one dir they agreed on, and what
    the launcher printed."""
    pattern = tmp_path / "runs" / "run_${now:%H-%M-%S_%f}"
    proc = run_train(["model=tiny_bert", "training=smoke", "baseline=none", *overrides,
                      f"hydra.run.dir={pattern}"], launcher=launcher, check=True, entry=entry)
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1, f"ranks wrote {len(runs)} run dirs: {runs}\n{proc.stdout[-2000:]}"
    return runs[0], proc.stdout + proc.stderr


def assert_written_by_rank_zero_only(run: Path) -> None:
    assert {p.name for p in run.iterdir()} == RUN_FILES
    log = (run / "train.log").read_text()
    assert "[rank0]" in log and "[rank1]" not in log


# Both forms the launcher takes: the entry file, and the installed module (`--module`).
@pytest.mark.parametrize("stage,entry", [(2, (str(TRAIN),)), (3, ("--module", "lorasweep.train"))],
                         ids=["zero2-file", "zero3-module"])
def test_deepspeed_launcher_trains_a_zero_engine_on_two_ranks(stage, entry, tmp_path,
                                                              monkeypatch):
    # DeepSpeed builds its CPU shared-memory op in the extensions dir on first use; a build
    # killed there (Ctrl-C) leaves its lock, and torch would wait for it on every rank forever.
    extensions = extensions_dir_with_stale_lock(tmp_path)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(extensions))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run, output = launched_run(deepspeed_launcher(2),
                               [f"deepspeed=zero{stage}", f"tracking.uri={uri}",
                                "tracking.experiment_name=two_ranks"], tmp_path, entry)
    meta = json.loads((run / "model_metadata.json").read_text())
    assert meta["wrapped_model_class"] == "DeepSpeedEngine"
    assert meta["zero_stage_engine"] == stage and meta["world_size"] == 2
    assert_written_by_rank_zero_only(run)
    # the adapter holds real weights, gathered from both ranks under ZeRO-3
    assert (run / "adapter" / "adapter_model.safetensors").stat().st_size > 1000
    assert_reload_reproduces_predictions(run)

    client = MlflowClient(uri)
    [logged] = client.search_runs([client.get_experiment_by_name("two_ranks").experiment_id])
    assert logged.info.status == "FINISHED" and "eval_f1_macro" in logged.data.metrics
    assert logged.data.tags["world_size"] == "2"
    assert logged.data.tags["zero_stage"] == str(stage)

    assert "removed a stale build lock" in output and not (extensions / SHM_OP / "lock").exists()
    assert "gcc " not in output  # DeepSpeed's libaio probe compiles quietly


def test_torchrun_without_deepspeed_trains_as_ddp(tmp_path):
    run, _ = launched_run(torchrun_launcher(2), ["deepspeed=none", "tracking=none"], tmp_path)
    meta = json.loads((run / "model_metadata.json").read_text())
    assert meta["wrapped_model_class"] == "DistributedDataParallel" and meta["world_size"] == 2
    assert_written_by_rank_zero_only(run)


def test_local_rank_argument_is_accepted():
    from lorasweep.distributed import strip_local_rank_arg

    saved = os.environ.pop("LOCAL_RANK", None)
    try:
        argv = ["train.py", "--local_rank=1", "lora.r=4", "--local_rank", "1"]
        assert strip_local_rank_arg(argv) == ["train.py", "lora.r=4"]
        assert os.environ["LOCAL_RANK"] == "1"
    finally:  # the rest of this test process is rank-less again
        os.environ.pop("LOCAL_RANK", None)
        if saved is not None:
            os.environ["LOCAL_RANK"] = saved


def first_checkpoint(run: Path, proc: subprocess.Popen, timeout: float = 240) -> Path:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        done = [p for p in (run / "checkpoints").glob("checkpoint-*")
                if (p / "trainer_state.json").is_file()]
        if done:
            return done[0]
        time.sleep(0.1)
    raise AssertionError(f"no checkpoint appeared (launcher exit code {proc.poll()})")


def test_killed_run_resumes_from_its_last_checkpoint(tmp_path, run_dir):
    args = [*deepspeed_launcher(2), str(TRAIN), "model=tiny_bert", "training=smoke",
            "baseline=none", "tracking=none", "deepspeed=zero2", "training.max_steps=30",
            "training.save_strategy=steps", "training.save_steps=10",
            "training.save_total_limit=2", f"hydra.run.dir={run_dir}"]
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(args, cwd=ROOT, env=cli_env(), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        first_checkpoint(run_dir, proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
        proc.wait()
    assert not (run_dir / "metrics.json").exists(), "the run finished before it could be killed"
    saved = max(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("checkpoint-*")
                if (p / "trainer_state.json").is_file())

    second = subprocess.run(args, cwd=ROOT, env=cli_env(), capture_output=True,
                            text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["resumed_from_step"] >= saved >= 10
    assert "resuming from" in second.stdout + second.stderr
    meta = json.loads((run_dir / "model_metadata.json").read_text())
    assert meta["global_step"] == 30
    last = run_dir / "checkpoints" / "checkpoint-30"
    state = json.loads((last / "trainer_state.json").read_text())
    assert state["global_step"] == 30


def test_rank_zero_resolves_the_run_dir_from_the_command_line_as_hydra_reads_it(tmp_path):
    """What rank 0 broadcasts: `hydra.run.dir` composed from the same flags and overrides the
    ranks' Hydra will read, a user's --config-dir and its options included."""
    from hydra.errors import MissingConfigException

    from lorasweep.train import resolve_run_dir

    (tmp_path / "my_conf" / "model").mkdir(parents=True)
    (tmp_path / "my_conf" / "model" / "my_bert.yaml").write_text(
        "defaults: [tiny_bert, _self_]\narch: {hidden_size: 48}\n")
    argv = ["train.py", "--config-dir", str(tmp_path / "my_conf"), "model=my_bert",
            f"hydra.run.dir={tmp_path}/run_${{now:%Y}}", "lora.r=4"]
    assert resolve_run_dir(argv) == f"{tmp_path}/run_{time.strftime('%Y')}"
    with pytest.raises(MissingConfigException, match="my_bert"):
        resolve_run_dir([a for a in argv if a != "--config-dir" and "my_conf" not in a])


def test_a_launched_trial_runs_the_module_with_the_config_flags_of_its_sweep():
    from omegaconf import OmegaConf

    from lorasweep.training.launcher import config_arguments, launcher_command

    hydra_cfg = OmegaConf.create({"job": {"config_name": "train"}, "runtime": {"config_sources": [
        {"path": "/pkg/lorasweep/conf", "schema": "file", "provider": "main"},
        {"path": "/home/me/my_conf", "schema": "file", "provider": "command-line"}]}})
    flags = config_arguments(hydra_cfg)
    assert flags == ["--config-dir", "/home/me/my_conf"]
    deepspeed = launcher_command("deepspeed", 2, ["model=my_bert"], "/run", config_args=flags)
    start = deepspeed.index("--module")
    assert deepspeed[start:start + 5] == ["--module", "lorasweep.train", "--config-dir",
                                          "/home/me/my_conf", "model=my_bert"]
    torchrun = launcher_command("torchrun", 2, [], "/run")
    assert torchrun[torchrun.index("-m", 3):][:2] == ["-m", "lorasweep.train"]
