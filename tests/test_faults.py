"""Faults on real runs: SIGTERM and Ctrl-C mid-training end the MLflow run KILLED with a reason
and a rerun resumes; two runs opening one fresh local MLflow store at once are both recorded; a
build lock left by a killed DeepSpeed op build is removed, one in use kept (a real DeepSpeed run
past such a lock: tests/test_distributed.py)."""

import json
import os
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from helpers import ROOT, SMOKE, TRAIN, cli_env, make_stale_lock, run_train

pytestmark = pytest.mark.slow


def runs_in(uri: str, experiment: str):
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    return [] if found is None else client.search_runs([found.experiment_id])


def default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for_checkpoint(run: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if any((p / "trainer_state.json").is_file()
               for p in (run / "checkpoints").glob("checkpoint-*")):
            return
        time.sleep(0.1)
    raise AssertionError(f"no checkpoint appeared (exit code {proc.poll()})")


@pytest.mark.parametrize("signum,code,reason", [
    (signal.SIGTERM, 143, "interrupted (SIGTERM)"), (signal.SIGINT, 130, "interrupted (Ctrl-C)")],
    ids=["SIGTERM", "SIGINT"])
def test_a_signal_mid_training_ends_the_run_killed_and_a_rerun_resumes(signum, code, reason,
                                                                       tmp_path, run_dir,
                                                                       cache_dir):
    run, uri = run_dir, f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [*SMOKE[:2], f"tracking.uri={uri}", "tracking.experiment_name=faults",
            "training.max_steps=80", "training.save_strategy=steps", "training.save_steps=5",
            f"hydra.run.dir={run}", f"data.cache_dir={cache_dir}"]
    # A job started in the background inherits SIGINT ignored; Python then adds no Ctrl-C handler.
    proc = subprocess.Popen([sys.executable, str(TRAIN), *args], cwd=ROOT, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_sigint)
    try:
        wait_for_checkpoint(run, proc)
        proc.send_signal(signum)
        sent = time.time()
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert time.time() - sent < 30, "the run did not stop promptly"
    assert proc.returncode == code, stderr[-3000:]
    assert "Traceback" not in stderr and f"lorasweep: {reason}" in stderr, stderr[-3000:]
    assert not (run / "metrics.json").exists(), "the run finished before the signal"
    [killed] = runs_in(uri, "faults")
    assert killed.info.status == "KILLED" and killed.data.tags["failure_reason"] == reason
    if signum != signal.SIGTERM:
        return  # resuming does not depend on which signal stopped the run

    again = run_train(args, check=True)
    assert "resuming from" in again.stdout + again.stderr
    assert json.loads((run / "metrics.json").read_text())["resumed_from_step"] >= 5
    statuses = sorted(r.info.status for r in runs_in(uri, "faults"))
    assert statuses == ["FINISHED", "KILLED"]


def test_a_signal_dropped_inside_garbage_collection_stops_training_at_the_step_end():
    """Python drops an exception raised inside a weakref callback ("Exception ignored in"): a
    SIGTERM handled there was once lost and the run went on to exit 0. The handler records the
    signal, and the step-end check raises it again."""
    from lorasweep import interrupts
    from lorasweep.training.callbacks import SignalCallback

    saved = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT), sys.unraisablehook
    dropped = []
    try:
        interrupts.raise_on_sigterm()
        sys.unraisablehook = dropped.append

        def on_collect(_):
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler runs between these bytecodes, in the callback
                pass

        class Node:
            pass

        node = Node()
        ref = weakref.ref(node, on_collect)  # noqa: F841 (the callback needs the ref alive)
        del node
        assert [type(d.exc_value) for d in dropped] == [interrupts.Terminated]
        with pytest.raises(interrupts.Terminated):
            SignalCallback().on_step_end(None, None, None)
    finally:
        signal.signal(signal.SIGTERM, saved[0])
        signal.signal(signal.SIGINT, saved[1])
        sys.unraisablehook = saved[2]
        interrupts._received = None


def test_two_runs_on_one_fresh_sqlite_store_are_both_recorded(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    procs = [subprocess.Popen(
        [sys.executable, str(TRAIN), *SMOKE[:2], f"tracking.uri={uri}",
         "tracking.experiment_name=together", f"hydra.run.dir={tmp_path / f'run{i}'}",
         f"data.cache_dir={tmp_path / f'cache{i}'}"],
        cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True) for i in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
    runs = runs_in(uri, "together")
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]
    assert len({r.data.tags["run_dir"] for r in runs}) == 2


def test_a_stale_extension_build_lock_is_removed_and_a_held_one_kept(tmp_path, monkeypatch,
                                                                       caplog):
    from lorasweep.training.deepspeed_config import clear_stale_build_locks

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    stale, held, young = (tmp_path / name / "lock" for name in ("stale_op", "held_op", "new_op"))
    make_stale_lock(stale)
    make_stale_lock(held)
    young.parent.mkdir()
    young.touch()
    fd = os.open(held, os.O_RDONLY)  # a build in progress keeps its lock open
    try:
        with caplog.at_level("WARNING", logger="lorasweep.training.deepspeed_config"):
            removed = clear_stale_build_locks()
    finally:
        os.close(fd)
    assert removed == [str(stale)]
    assert not stale.exists() and held.exists() and young.exists()
    assert f"removed a stale build lock {stale}" in caplog.text
