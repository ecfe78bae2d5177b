"""A full disk, for real: a small tmpfs (mounted as root; skipped where mounting is not allowed)
filled with a ballast file so that the disk runs out at a chosen write. Each write point ends in
one line and exit code 2, predict and export refuse what it left, and after the ballast goes the
same command finishes (resuming from a checkpoint where there is one) with the result of an
undisturbed run on the same seed.

Where a run fills the disk is set from the undisturbed run's own files: the space they take on
the tmpfs (whole pages) in the order the run writes them (lorasweep.training.pipeline: the model,
the tokenizer, then `finish`'s files, run_complete.json last)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from helpers import ROOT, SAMPLE, SMOKE, cli_env, compose_cfg, run_train

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("disk_full")]

PREDICT = ROOT / "src" / "lorasweep" / "predict.py"
PAGE = 4096
# The runs here fail and rerun many times: no head warm start (the blend, the last write of
# its own kind, needs the TF-IDF baseline).
QUICK = ["model.head_init=random"]
# Checkpoints at steps 2, 4 and 6 (the best and the newest kept), the blend on.
CHECKPOINTED = ["training.eval_strategy=steps", "training.eval_steps=2",
                "training.save_strategy=steps", "training.save_steps=2",
                "training.load_best_model_at_end=true", "tracking.log_model=false"]
# What the run writes after training, in its order (`writing` names these paths).
FINAL_WRITES = ["adapter", "tokenizer", "config.yaml", "label_map.json", "dataset_metadata.json",
                "blend", "metrics.json", "model_metadata.json", "reports",
                "reports/predictions_validation.csv", "reports/predictions_test.csv",
                "run_complete.json"]


@pytest.fixture
def disk(tmp_path: Path):
    """A 64 MB tmpfs of the test's own."""
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (it needs root with CAP_SYS_ADMIN): "
                    f"{proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], check=False)


@pytest.fixture(scope="module")
def small_ledger(tmp_path_factory) -> Path:
    """500 rows of the sample ledger: the runs here fail and rerun many times."""
    path = tmp_path_factory.mktemp("data") / "ledger.parquet"
    pd.read_parquet(SAMPLE).head(500).to_parquet(path, index=False)
    return path


def fill(disk: Path, leave: int) -> Path:
    """A ballast file that leaves `leave` bytes (whole pages) free on `disk`."""
    ballast = disk / "ballast"
    held = ballast.stat().st_blocks * 512 if ballast.exists() else 0
    size = shutil.disk_usage(disk).free + held - leave // PAGE * PAGE
    assert size > 0, f"the disk has less than {leave} bytes to leave free"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        os.posix_fallocate(fd, 0, size)
    finally:
        os.close(fd)
    assert shutil.disk_usage(disk).free == leave // PAGE * PAGE
    return ballast


def footprint(path: Path) -> int:
    """The bytes `path` (a file, or a dir's files) takes on its filesystem."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_blocks * 512 for p in files)


def checkpoint_footprint(run: Path) -> int:
    """The footprint of one checkpoint (a finished run keeps the best one)."""
    [kept] = (run / "checkpoints").iterdir()
    return footprint(kept)


def final_write_sizes(run: Path) -> list[int]:
    """The footprint of each of FINAL_WRITES in a finished run (reports: less the predictions)."""
    sizes = []
    for name in FINAL_WRITES:
        size = footprint(run / name)
        if name == "reports":
            size -= sum(footprint(p) for p in (run / "reports").glob("predictions_*.csv"))
        sizes.append(size)
    return sizes


def run_predict(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(PREDICT), *args], cwd=ROOT, capture_output=True,
                          text=True, env=cli_env())


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Logging error" not in proc.stderr, proc.stderr
    [line] = [x for x in proc.stderr.splitlines() if x.startswith("lorasweep: error:")]
    return line


def predictions(run: Path) -> pd.DataFrame:
    return pd.read_csv(run / "reports" / "predictions_test.csv", dtype={"label": str,
                                                                       "pred_label": str})


def assert_same_result(run: Path, reference: Path) -> None:
    ours, theirs = predictions(run), predictions(reference)
    assert ours["pred_label"].tolist() == theirs["pred_label"].tolist()
    pd.testing.assert_series_equal(ours["pred_score"], theirs["pred_score"], rtol=1e-5)
    metrics = [json.loads((d / "metrics.json").read_text()) for d in (run, reference)]
    for key in ("eval_f1_macro", "test_f1_macro", "blend_weight", "eval_blend_f1_macro"):
        assert metrics[0][key] == pytest.approx(metrics[1][key]), key


def test_a_full_disk_at_each_write_of_a_run_is_one_error_naming_it_and_a_rerun_finishes(
        disk, small_ledger, tmp_path):
    """In this process (the CLI's line and exit code: the tests below), the disk fills as each
    of the run's final files is written, and as the data cache is: a WriteError naming it, a dir
    that readers refuse, no cache entry, and after the ballast goes the same run finishes with
    the undisturbed run's result."""
    from omegaconf import OmegaConf

    from lorasweep import outputs
    from lorasweep.errors import UserError
    from lorasweep.export import export_run
    from lorasweep.runs.load import check_run_dir
    from lorasweep.training.pipeline import run

    def config(run_dir: Path, cache: Path = tmp_path / "cache"):
        return compose_cfg([*SMOKE[:2], *QUICK, "tracking=none",
                            f"data.train_path={small_ledger}", f"data.cache_dir={cache}"],
                           run_dir)

    reference = disk / "reference"
    run(config(reference))
    sizes = final_write_sizes(reference)
    shutil.copytree(reference / "reports", tmp_path / "reference" / "reports")
    shutil.copy(reference / "metrics.json", tmp_path / "reference")
    shutil.rmtree(reference)
    reference = tmp_path / "reference"
    for i, name in enumerate(FINAL_WRITES):
        run_dir = disk / f"run-{i}"
        ballast = fill(disk, sum(sizes[:i]))
        with pytest.raises(outputs.WriteError) as failed:
            run(config(run_dir))
        assert str(failed.value).startswith(
            f"no space left on device writing {run_dir / name} ("), name
        assert str(failed.value).endswith("MB free): free space and rerun the same command to "
                                          "resume"), name
        with pytest.raises(UserError, match=f"run_dir={run_dir}: not a finished run: "):
            check_run_dir(str(run_dir))  # what predict, export and the MLflow model start with
        if name == "blend":
            with pytest.raises(UserError, match="not a finished run: no run_complete.json: it "
                                                "stopped while writing its outputs"):
                export_run(OmegaConf.create({"run_dir": str(run_dir),
                                             "output": str(tmp_path / "exported")}))
            assert not (tmp_path / "exported").exists()
        ballast.unlink()
        if name in ("adapter", "blend", "run_complete.json"):
            # a partial dir, a temp dir removed, every other file written
            run(config(run_dir))
            check_run_dir(str(run_dir))
            assert_same_result(run_dir, reference)
        shutil.rmtree(run_dir)

    # The data cache: room for the random-weight test model, which is materialised there first.
    cache = disk / "cache"
    ballast = fill(disk, footprint(tmp_path / "cache" / "random_models"))
    run_dir = tmp_path / "cached"
    with pytest.raises(outputs.WriteError) as failed:
        run(config(run_dir, cache))
    assert str(failed.value).startswith(f"no space left on device writing {cache}/prepared/")
    assert str(failed.value).endswith("MB free): free space and rerun the same command")
    assert (cache / "random_models").is_dir() and not any((cache / "prepared").iterdir())
    ballast.unlink()
    run(config(run_dir, cache))
    assert_same_result(run_dir, reference)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[list[str], Path]:
    """The CLI run the tests below disturb, undisturbed: its args (less hydra.run.dir) and dir.
    On the whole sample ledger: its blend (2.4 MB) outweighs a checkpoint (1 MB), so the disk
    can hold the checkpoints while training and still fill up as the blend is written."""
    base = tmp_path_factory.mktemp("reference")
    args = [*SMOKE[:2], *QUICK, *CHECKPOINTED,
            f"tracking.uri=sqlite:///{base / 'mlflow.db'}", "tracking.experiment_name=disk"]
    run_train([*args, f"hydra.run.dir={base / 'run'}", f"data.cache_dir={base / 'cache'}"],
              check=True)
    return args, base / "run"


def test_a_full_disk_while_saving_the_blend_leaves_a_refused_run_that_resumes(
        disk, reference, tmp_path):
    """The reported case: the disk fills as the blend is written. One line, the MLflow run
    FAILED with it, predict refuses the dir, the checkpoints stay; freed, the same command
    resumes from the last checkpoint without training and ends with the undisturbed result."""
    args, ref = reference
    run = disk / "run"
    args = [*args, f"hydra.run.dir={run}", f"data.cache_dir={tmp_path / 'cache'}"]
    # Until the outputs are written, the best checkpoint and the newest (the last) stay; the
    # reference kept only the best. Checkpoints are all of one size.
    kept = 1 if (ref / "checkpoints" / "checkpoint-6").exists() else 2
    before_blend = kept * checkpoint_footprint(ref) + sum(
        footprint(ref / name) for name in (".hydra", "train.log",
                                           *FINAL_WRITES[:FINAL_WRITES.index("blend")]))
    ballast = fill(disk, before_blend + footprint(ref / "blend") // 2)

    failed = run_train(args)
    line = one_error_line(failed)
    assert line.startswith(f"lorasweep: error: no space left on device writing {run / 'blend'} (")
    assert line.endswith("MB free): free space and rerun the same command to resume")
    assert not (run / "run_complete.json").exists() and not (run / "metrics.json").exists()
    assert any((p / "trainer_state.json").is_file() for p in (run / "checkpoints").iterdir())
    client = MlflowClient(args[[a.startswith("tracking.uri=") for a in args].index(True)]
                          .split("=", 1)[1])
    runs = client.search_runs([client.get_experiment_by_name("disk").experiment_id],
                              filter_string=f"tags.run_dir = '{run}'")
    [recorded] = runs
    assert recorded.info.status == "FAILED"
    assert recorded.data.tags["failure_reason"] == line.removeprefix("lorasweep: error: ")
    rows = tmp_path / "rows.csv"
    pd.read_parquet(SAMPLE).head(5).to_csv(rows, index=False)
    refused = run_predict([f"run_dir={run}", f"input={rows}", f"output={tmp_path / 'p.csv'}"])
    assert one_error_line(refused) == (
        f"lorasweep: error: run_dir={run}: not a finished run: no run_complete.json: it stopped "
        "while writing its outputs; rerun its training command to finish it (it resumes from "
        "its last checkpoint)")
    assert not (tmp_path / "p.csv").exists()

    ballast.unlink()
    again = run_train(args, check=True)
    assert f"resuming from {run / 'checkpoints' / 'checkpoint-6'}" in again.stdout + again.stderr
    assert json.loads((run / "metrics.json").read_text())["resumed_from_step"] == 6
    assert (run / "run_complete.json").is_file()
    assert_same_result(run, ref)


def test_a_full_disk_mid_checkpoint_is_one_line_and_the_rerun_resumes_from_a_complete_one(
        disk, reference, tmp_path):
    args, ref = reference
    run = disk / "run"
    args = [*args, f"hydra.run.dir={run}", f"data.cache_dir={tmp_path / 'cache'}"]
    checkpoint = checkpoint_footprint(ref)
    # room for Hydra's files, the log and one checkpoint and a half: the second one fails
    ballast = fill(disk, footprint(ref / ".hydra") + footprint(ref / "train.log") + PAGE
                   + checkpoint * 3 // 2)

    line = one_error_line(run_train(args))
    assert line.startswith(f"lorasweep: error: no space left on device writing "
                           f"{run / 'checkpoints'} (")
    assert (run / "checkpoints" / "checkpoint-2" / "trainer_state.json").is_file()
    assert not (run / "checkpoints" / "checkpoint-4" / "trainer_state.json").exists()

    ballast.unlink()
    again = run_train(args, check=True)
    assert f"resuming from {run / 'checkpoints' / 'checkpoint-2'}" in again.stdout + again.stderr
    assert json.loads((run / "metrics.json").read_text())["resumed_from_step"] == 2
    assert_same_result(run, ref)


def test_a_full_disk_while_predicting_keeps_the_earlier_output(disk, reference, tmp_path):
    from omegaconf import OmegaConf

    from lorasweep.outputs import WriteError
    from lorasweep.predict import PredictConfig, predict_file

    rows = tmp_path / "rows.csv"
    pd.read_parquet(SAMPLE).head(200).to_csv(rows, index=False)
    output = disk / "predictions.csv"
    output.write_text("an earlier output\n")
    request = OmegaConf.merge(OmegaConf.structured(PredictConfig), {
        "run_dir": str(reference[1]), "input": str(rows), "output": str(output),
        "progress": False})
    ballast = fill(disk, 0)

    with pytest.raises(WriteError) as failed:
        predict_file(request)  # the predict CLI's work, in this process
    assert str(failed.value).startswith(f"no space left on device writing {output} (")
    assert str(failed.value).endswith("MB free): free space and rerun the same command")
    assert output.read_text() == "an earlier output\n"
    assert sorted(p.name for p in disk.iterdir()) == ["ballast", "predictions.csv"]

    ballast.unlink()
    predict_file(request)
    assert len(pd.read_csv(output)) == 200

    # A read-only filesystem: the same one line, with the system's reason.
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    with pytest.raises(WriteError) as failed:
        predict_file(request)
    assert str(failed.value) == (f"cannot write {output}: Read-only file system: make it "
                                 "writable and rerun the same command")
