"""MLflow against a real `mlflow server` on loopback: one run per training, status
FINISHED/FAILED, params/metrics/artifacts; an unreachable server; masked secrets. (A 2-rank
DeepSpeed run logged once from rank 0: tests/test_distributed.py.)"""

import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from helpers import assert_reload_reproduces_predictions, compose_cfg, run_train
from lorasweep.distributed import free_port
from lorasweep.redaction import MASK
from lorasweep.tracking.tracker import flatten_params

# One xdist worker runs the file: one MLflow server for all of its tests.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("mlflow_server")]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'store.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
        stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(uri + "/health", timeout=2):
                break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        raise RuntimeError("mlflow server did not start: " + (root / "server.log").read_text())
    yield uri
    proc.terminate()
    proc.wait(timeout=30)


def runs_of(uri: str, experiment: str):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id]), client


def artifact_names(client, run_id, path=None):
    return {Path(a.path).name for a in client.list_artifacts(run_id, path)}


def test_one_process_run_is_logged_once_and_finished(mlflow_server, tmp_path):
    run_train(["model=tiny_bert", "training=smoke", "baseline=none",
               f"tracking.uri={mlflow_server}",
               "tracking.experiment_name=one_proc", f"hydra.run.dir={tmp_path / 'run'}",
               "lora.r=4", "+training.extra.hub_token=hf_secret_value"], check=True)
    runs, client = runs_of(mlflow_server, "one_proc")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["lora.r"] == "4" and run.data.params["model.arch.model_type"] == "bert"
    assert run.data.params["training.extra.hub_token"] == MASK
    for key in ("eval_f1_macro", "test_accuracy", "train_loss", "speed/tokens_per_sec",
                "cpu/rss_mb"):
        assert key in run.data.metrics, key
    assert run.data.tags["world_size"] == "1" and run.data.tags["git_commit"]
    names = artifact_names(client, run.info.run_id)
    assert {"metrics.json", "label_map.json", "config.yaml", "dataset_metadata.json",
            "model_metadata.json", "reports", "hydra"} <= names
    # The adapter is in the run's MLflow model (tests/test_serving.py), not logged twice.
    assert not names & {"adapter", "tokenizer", "blend"}
    (model,) = client.search_logged_models([run.info.experiment_id])
    assert model.source_run_id == run.info.run_id and model.name == "model"
    assert "confusion_matrix_test.png" in artifact_names(client, run.info.run_id, "reports")


def test_a_run_that_raises_ends_failed(mlflow_server, tmp_path):
    proc = run_train(["model=tiny_bert", "training=smoke", "baseline=none",
                      f"tracking.uri={mlflow_server}",
                      "tracking.experiment_name=failing", f"hydra.run.dir={tmp_path / 'run'}",
                      "+training.extra.no_such_argument=1"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    runs, _ = runs_of(mlflow_server, "failing")
    assert len(runs) == 1 and runs[0].info.status == "FAILED"


def test_unreachable_server_warns_or_fails_before_training(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    proc = run_train(["model=tiny_bert", "training=smoke", "baseline=none", f"tracking.uri={uri}",
                      f"hydra.run.dir={tmp_path / 'a'}"], check=True)
    assert "unreachable" in proc.stdout + proc.stderr
    assert (tmp_path / "a" / "metrics.json").is_file()
    # the warning comes again at the end, not only first
    assert "WARNING: nothing was logged to MLflow" in proc.stdout
    proc = run_train(["model=tiny_bert", "training=smoke", "baseline=none", f"tracking.uri={uri}",
                      "tracking.required=true", f"hydra.run.dir={tmp_path / 'b'}"])
    assert proc.returncode == 2
    assert f"tracking.uri={uri}: MLflow server unreachable" in proc.stderr
    assert not (tmp_path / "b" / "label_map.json").exists()  # stopped before any data work


def test_flatten_params_masks_secrets():
    cfg = compose_cfg(["model=tiny_bert", "tracking.uri=http://x", "lora.r=4",
                       "+training.extra.api_key=abc"], "/tmp/unused")
    flat = flatten_params(cfg)
    assert flat["training.extra.api_key"] == MASK and flat["lora.r"] == "4"
    assert flat["tracking.uri"] == "http://x"
    assert flat["model.tokenizer_name_or_path"].endswith("model")  # "token" only as a word


def files_holding(root: Path, needle: bytes):
    """Every file under `root` whose bytes hold `needle`, looking inside zip files too
    (torch.save writes a zip)."""
    hits = []
    for path in (p for p in root.rglob("*") if p.is_file()):
        blobs = [path.read_bytes()]
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                blobs += [archive.read(name) for name in archive.namelist()]
        if any(needle in blob for blob in blobs):
            hits.append(str(path))
    return hits


@pytest.mark.parametrize("given", ["inline", "env"])
def test_a_secret_is_nowhere_in_the_run_dir_or_mlflow(mlflow_server, tmp_path, run_dir, monkeypatch,
                                                      given):
    """A hub token passed inline or through ${oc.env:...}: no file of the run dir (checkpoints
    included) and no MLflow param, tag or artifact holds it."""
    secret = f"hf_Zq{given}Secret7731"
    value = secret if given == "inline" else "${oc.env:LS_TEST_HUB_TOKEN}"
    monkeypatch.setenv("LS_TEST_HUB_TOKEN", secret)  # the CLI's environment is this one's
    experiment = f"secret_{given}"
    run_train(["model=tiny_bert", "training=smoke", "baseline=none",
               f"tracking.uri={mlflow_server}",
               f"tracking.experiment_name={experiment}", f"hydra.run.dir={run_dir}",
               f"+training.extra.hub_token={value}", "training.save_strategy=steps",
               "training.save_steps=3"], check=True)
    assert list(run_dir.glob("checkpoints/checkpoint-*/training_args.bin"))
    assert (run_dir / "adapter" / "training_args.bin").is_file()
    assert files_holding(run_dir, secret.encode()) == []
    runs, client = runs_of(mlflow_server, experiment)
    run = runs[0]
    fields = {**run.data.params, **run.data.tags}
    assert [k for k, v in fields.items() if secret in v] == []
    assert run.data.params["training.extra.hub_token"] == (MASK if given == "inline" else value)
    downloaded = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "mlflow")))
    assert (downloaded / "hydra" / "hydra.yaml").is_file()
    assert files_holding(downloaded, secret.encode()) == []
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)  # what runs:/ resolves against
    model = Path(mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/model",
                                                     dst_path=str(tmp_path / "model")))
    assert (model / "MLmodel").is_file() and list(model.rglob("adapter_model.safetensors"))
    assert files_holding(model, secret.encode()) == []
    if given == "env":  # the config keeps the interpolation; reloading needs no secret
        assert "${oc.env:LS_TEST_HUB_TOKEN}" in (run_dir / "config.yaml").read_text()
        monkeypatch.delenv("LS_TEST_HUB_TOKEN")
        assert_reload_reproduces_predictions(run_dir)
