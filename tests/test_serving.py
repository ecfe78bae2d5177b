"""The run's MLflow model, for real: one tiny run (with its blend) logged to a sqlite store and
registered; the model loaded in a fresh process, and served by `mlflow models serve` on loopback,
predicts what predict.py predicts on the same rows; bad requests are a 400 naming the column and
the server keeps serving; the inputs a service gets (extra columns, nulls, no rows, 10,000 rows,
unicode, very long texts) each go through the real server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from helpers import SAMPLE, cli_env, run_train
from lorasweep.distributed import free_port

# One xdist worker runs the file: one trained run and one server for all of its tests.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("served_model")]

NAME = "ledger-classifier"
COLUMNS = ["vendor", "description", "amount", "vat_type", "payment_method", "department"]
ATOL = 1e-6  # the same rows in the same batches: only float noise may differ
PREDICTED = ["pred_label", "pred_score", "top1_label", "top1_score", "top2_label", "top2_score",
             "top3_label", "top3_score"]


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory) -> SimpleNamespace:
    """A tiny run that blends with its TF-IDF baseline, logged and registered as NAME."""
    from mlflow.tracking import MlflowClient

    tmp = tmp_path_factory.mktemp("served")
    uri = f"sqlite:///{tmp / 'store.db'}"
    client = MlflowClient(uri)
    # The artifacts in tmp, not in ./mlruns of the repository (the CLI runs from its root).
    client.create_experiment("serving", artifact_location=str(tmp / "artifacts"))
    # As tests/test_predict_export.py's run: a head moved off its near-uniform init, so rows
    # get distinct scores (in fp32: in bf16 this random tiny model gives every row about the
    # same scores); an absolute cache dir, which holds the random base model.
    run_train(["model=tiny_bert", "training=smoke", "training.mixed_precision=no",
               "model.head_init=random", "lora=default",
               "loss=ce", "loss.label_smoothing=0", "training.learning_rate=0.05",
               "training.max_steps=6", f"hydra.run.dir={tmp / 'run'}",
               f"data.cache_dir={tmp / 'cache'}", f"tracking.uri={uri}",
               "tracking.experiment_name=serving", f"tracking.registered_model_name={NAME}"],
              check=True)
    (run,) = client.search_runs([client.get_experiment_by_name("serving").experiment_id])
    assert (tmp / "run" / "blend" / "blend.json").is_file()  # the served model blends
    return SimpleNamespace(run_dir=tmp / "run", uri=uri, run_id=run.info.run_id, tmp=tmp)


@pytest.fixture(scope="module")
def server(logged_run):
    """`mlflow models serve -m runs:/<id>/model --env-manager local` on a free loopback port."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**cli_env(), "MLFLOW_TRACKING_URI": logged_run.uri}
    log_path = logged_run.tmp / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m",
             f"runs:/{logged_run.run_id}/model", "--env-manager", "local",
             "--host", "127.0.0.1", "--port", str(port)],
            env=env, cwd=logged_run.tmp, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)  # its own process group: the server and its workers stop
    try:
        deadline = time.time() + 300
        while True:
            try:
                with urllib.request.urlopen(url + "/ping", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("mlflow models serve did not start:\n"
                                       + log_path.read_text()[-5000:]) from None
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def post(url: str, payload) -> tuple[int, dict]:
    request = urllib.request.Request(url + "/invocations", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def as_json(frame: pd.DataFrame, orient: str):
    """`dataframe_split` / `dataframe_records` of `frame`, missing values as JSON null."""
    plain = frame.astype(object).where(frame.notna(), None)
    if orient == "split":
        return {"dataframe_split": {"columns": list(plain.columns),
                                    "data": plain.values.tolist()}}
    return {"dataframe_records": plain.to_dict(orient="records")}


def predictions(body: dict) -> pd.DataFrame:
    return pd.DataFrame(body["predictions"], columns=PREDICTED)


def predict_py(run_dir: Path, rows: pd.DataFrame, tmp_path: Path, blend: bool = True):
    """predict.py's output for `rows` (its work, in this process), prediction columns only."""
    from omegaconf import OmegaConf

    from lorasweep.predict import PredictConfig, predict_file

    source, out = tmp_path / f"rows-{blend}.parquet", tmp_path / f"preds-{blend}.parquet"
    rows.to_parquet(source, index=False)
    predict_file(OmegaConf.merge(OmegaConf.structured(PredictConfig), {
        "run_dir": str(run_dir), "input": str(source), "output": str(out), "progress": False,
        "blend": blend}))
    return pd.read_parquet(out)[PREDICTED]


def assert_same_predictions(got: pd.DataFrame, expected: pd.DataFrame) -> None:
    assert len(got) == len(expected)
    for i in (1, 2, 3):
        assert got[f"top{i}_label"].tolist() == expected[f"top{i}_label"].tolist()
        np.testing.assert_allclose(got[f"top{i}_score"].astype(float),
                                   expected[f"top{i}_score"], atol=ATOL)
    assert got["pred_label"].tolist() == expected["pred_label"].tolist()


@pytest.fixture(scope="module")
def rows() -> pd.DataFrame:
    """Ledger rows with descriptions from 1 to ~150 words (some past max_length), shuffled."""
    table = pd.read_parquet(SAMPLE).sample(48, random_state=7).reset_index(drop=True)
    repeats = np.random.default_rng(0).integers(0, 40, size=len(table))
    table["description"] = [d + " extra" * int(n)
                            for d, n in zip(table["description"], repeats, strict=True)]
    return table[COLUMNS]


@pytest.fixture(scope="module")
def expected(logged_run, rows, tmp_path_factory) -> pd.DataFrame:
    return predict_py(logged_run.run_dir, rows, tmp_path_factory.mktemp("expected"))


LOAD_IN_A_FRESH_PROCESS = """
import json, sys
import mlflow, pandas as pd
run_id, name, source, out = sys.argv[1:]
rows = pd.read_parquet(source)
model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
model.predict(rows).to_parquet(f"{out}/blend.parquet")
model.unwrap_python_model().run.blend = None  # the model alone, as predict.py blend=false
model.predict(rows).to_parquet(f"{out}/alone.parquet")
mlflow.pyfunc.load_model(f"models:/{name}/1").predict(rows).to_parquet(f"{out}/registry.parquet")
info = mlflow.models.get_model_info(f"runs:/{run_id}/model")
import lorasweep
print(json.dumps({"lorasweep": lorasweep.__file__, "deepspeed": "deepspeed" in sys.modules,
                  "inputs": info.signature.inputs.input_names(),
                  "outputs": info.signature.outputs.input_names()}))
"""


def test_the_logged_model_predicts_what_predict_py_predicts_in_a_fresh_process(
        logged_run, rows, expected, tmp_path):
    rows.to_parquet(tmp_path / "rows.parquet", index=False)
    proc = subprocess.run([sys.executable, "-c", LOAD_IN_A_FRESH_PROCESS, logged_run.run_id, NAME,
                           str(tmp_path / "rows.parquet"), str(tmp_path)], cwd=tmp_path,
                          env={**cli_env(), "MLFLOW_TRACKING_URI": logged_run.uri},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    # The model's own copy of lorasweep, not the installed one; nothing training-only imported.
    assert "/code/lorasweep/" in report["lorasweep"] and not report["deepspeed"]
    assert report["inputs"] == COLUMNS and report["outputs"] == PREDICTED
    assert_same_predictions(pd.read_parquet(tmp_path / "blend.parquet"), expected)
    assert_same_predictions(pd.read_parquet(tmp_path / "registry.parquet"), expected)
    alone = predict_py(logged_run.run_dir, rows, tmp_path, blend=False)
    assert_same_predictions(pd.read_parquet(tmp_path / "alone.parquet"), alone)
    # A row's scores differ from the next row's by far more than the tolerance.
    assert np.median(np.abs(np.diff(alone["top1_score"]))) > 100 * ATOL


def test_the_logged_model_has_its_requirements_and_no_pickle(logged_run, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", logged_run.uri)  # what runs:/ resolves against
    local = Path(mlflow.artifacts.download_artifacts(f"runs:/{logged_run.run_id}/model",
                                                     dst_path=str(tmp_path)))
    requirements = (local / "requirements.txt").read_text().split()
    names = {line.split("==")[0] for line in requirements if "==" in line}
    assert {"torch", "transformers", "peft", "mlflow", "scikit-learn"} <= names
    assert not names & {"deepspeed", "optuna", "submitit", "hydra-submitit-launcher"}
    assert not any("+cpu" in line for line in requirements)
    assert json.loads((local / "input_example.json").read_text())["columns"] == COLUMNS
    files = {p.name for p in local.rglob("*") if p.is_file()}
    assert {"adapter_model.safetensors", "blend.json", "label_map.json", "served.py"} <= files
    assert not [p for p in local.rglob("*") if p.suffix in (".pkl", ".bin")]


@pytest.mark.parametrize("orient", ["split", "records"])
def test_the_server_answers_json_rows_with_predict_py_predictions(server, rows, expected, orient):
    status, body = post(server, as_json(rows, orient))
    assert status == 200, body
    assert_same_predictions(predictions(body), expected)


def test_a_malformed_request_is_a_400_naming_the_column_and_the_server_keeps_serving(
        server, rows, expected):
    status, body = post(server, as_json(rows.drop(columns=["vendor"]), "split"))
    assert status == 400 and "missing inputs ['vendor']" in body["message"], body
    wrong = rows.head(3).astype(object)
    wrong["amount"] = "a lot"
    status, body = post(server, as_json(wrong, "records"))
    assert status == 400 and "column amount to type 'float64'" in body["message"], body
    status, body = post(server, {"dataframe_split": {"columns": COLUMNS}})  # no "data"
    assert 400 <= status < 500, body
    status, body = post(server, as_json(rows, "split"))
    assert status == 200
    assert_same_predictions(predictions(body), expected)


def test_extra_columns_are_ignored(server, rows, expected):
    extra = rows.assign(acct_code="81100", note="paid twice")
    status, body = post(server, as_json(extra[["note", *COLUMNS, "acct_code"]], "records"))
    assert status == 200, body
    assert_same_predictions(predictions(body), expected)


def test_nulls_are_left_out_as_predict_py_leaves_them_out(server, logged_run, rows, tmp_path):
    holes = rows.head(12).astype(object)
    holes.loc[::2, "vendor"] = None
    holes.loc[1::3, "amount"] = None
    holes.loc[5, COLUMNS] = None  # a row of nulls only
    status, body = post(server, as_json(holes, "split"))
    assert status == 200, body
    assert_same_predictions(predictions(body), predict_py(logged_run.run_dir, holes, tmp_path))


def test_an_empty_batch_gets_no_predictions(server):
    status, body = post(server, {"dataframe_split": {"columns": COLUMNS, "data": []}})
    assert status == 200 and body["predictions"] == [], body


def test_ten_thousand_rows_in_one_request(server, logged_run, tmp_path):
    many = pd.read_parquet(SAMPLE).sample(10_000, replace=True, random_state=1)[COLUMNS]
    status, body = post(server, as_json(many.reset_index(drop=True), "split"))
    assert status == 200, body
    assert_same_predictions(predictions(body), predict_py(logged_run.run_dir, many, tmp_path))


def test_unicode_and_very_long_texts(server, logged_run, rows, tmp_path):
    odd = rows.head(6).copy()
    odd.loc[0, "description"] = "東京 オフィス 用品 — café ☕ naïve Zürich 🧾"
    odd.loc[1, "vendor"] = "Ünïcödé Ltd. 株式会社"
    odd.loc[2, "description"] = "printer paper and toner " * 20_000  # 480,000 characters
    odd.loc[3, "vendor"] = "x" * 100_000  # one word longer than max_length in tokens
    status, body = post(server, as_json(odd, "records"))
    assert status == 200, body
    assert_same_predictions(predictions(body), predict_py(logged_run.run_dir, odd, tmp_path))
