"""Rows/s through `mlflow models serve` against predict.py, on the same rows, side by side.

    python bench/serve.py            # MiniLM (model=minilm training=smoke), the 4,000 sample rows
    python bench/serve.py --tiny     # tiny_bert, 300 rows (seconds; the test suite)
    python bench/serve.py --rows 2000 --request-rows 100

One run is trained (a few steps: prediction speed does not depend on how well it learned) and
logged to a temporary MLflow store; its model is served on loopback. After one untimed call on
each side, alternating, best of --repeats:
  predict.py, model loaded     LoadedRun.predict on the rows, in this process: predict.py's work
                               less reading, writing and the model load
  predict.py CLI               `python src/lorasweep/predict.py ...`: start, load, predict, write
  endpoint, one request        every row in one POST (dataframe_split)
  endpoint, N-row requests     the rows in POSTs of --request-rows rows, one after another
The ratios are endpoint rows/s over predict.py's with the model loaded (what HTTP, JSON and the
schema check cost), and over the CLI's (what a service saves a caller who would start predict.py).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

from _common import ROOT, fill_defaults

SAMPLE = ROOT / "data" / "sample_ledger" / "ledger.parquet"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny_bert, 300 rows (seconds)")
    parser.add_argument("--rows", type=int, help="rows predicted by each side")
    parser.add_argument("--request-rows", type=int, default=100, help="rows per small request")
    parser.add_argument("--repeats", type=int, help="alternating measurements per side; best")
    args = parser.parse_args(argv)
    fill_defaults(args, tiny={"rows": 300, "repeats": 1}, full={"rows": 4000, "repeats": 2})
    args.model = "tiny_bert" if args.tiny else "minilm"
    return args


def env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def train_and_log(args, work: str) -> tuple[str, str, str]:
    """(run dir, tracking uri, run id) of a few-step run logged as an MLflow model."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{work}/store.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("bench", artifact_location=f"{work}/artifacts")
    run_dir = f"{work}/run"
    subprocess.run([sys.executable, str(ROOT / "src" / "lorasweep" / "train.py"),
                    f"model={args.model}", "training=smoke", "training.max_steps=4",
                    f"hydra.run.dir={run_dir}", f"data.cache_dir={work}/cache",
                    f"tracking.uri={uri}", "tracking.experiment_name=bench"],
                   cwd=ROOT, env=env(), check=True, capture_output=True)
    (run,) = client.search_runs([experiment])
    return run_dir, uri, run.info.run_id


def start_server(uri: str, run_id: str, work: str) -> tuple[subprocess.Popen, str, float]:
    from lorasweep.distributed import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m",
                             f"runs:/{run_id}/model", "--env-manager", "local",
                             "--host", "127.0.0.1", "--port", str(port)],
                            # One request of every row outlasts the server's default 60 s
                            # on a busy CPU (a 504): the limit raised for the bench
                            env={**env(), "MLFLOW_TRACKING_URI": uri,
                                 "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT": "600"}, cwd=work,
                            stdout=open(f"{work}/serve.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    while True:
        try:
            with urllib.request.urlopen(url + "/ping", timeout=2):
                return proc, url, time.perf_counter() - started
        except OSError:
            if proc.poll() is not None or time.perf_counter() - started > 600:
                raise RuntimeError(open(f"{work}/serve.log").read()[-5000:]) from None
            time.sleep(0.25)


def post_rows(url: str, frame) -> list:
    plain = frame.astype(object).where(frame.notna(), None)
    payload = {"dataframe_split": {"columns": list(plain.columns), "data": plain.values.tolist()}}
    request = urllib.request.Request(url + "/invocations", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())["predictions"]


def timed(fn, *args) -> tuple[object, float]:
    started = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - started


def measure(args, run_dir: str, url: str, rows, work: str) -> dict[str, float]:
    """Seconds per side, best of args.repeats, the sides alternating."""
    from lorasweep.config import PredictConfig
    from lorasweep.runs.inference import LoadedRun

    run = LoadedRun.load(run_dir)
    columns = rows.to_dict(orient="list")
    rows.to_parquet(f"{work}/rows.parquet", index=False)
    cli = [sys.executable, str(ROOT / "src" / "lorasweep" / "predict.py"), f"run_dir={run_dir}",
           f"input={work}/rows.parquet", f"output={work}/preds.parquet", "progress=false"]
    step = args.request_rows
    # Untimed first calls: lazy initialisation on both sides (kernels, the server's first request)
    run.predict(rows.head(step).to_dict(orient="list"))
    post_rows(url, rows.head(step))
    best: dict[str, float] = {}
    for _ in range(args.repeats):
        sides = {
            "predict.py, model loaded": lambda: run.predict(columns, PredictConfig.batch_size,
                                                            PredictConfig.top_k),
            "predict.py CLI": lambda: subprocess.run(cli, env=env(), check=True,
                                                     capture_output=True),
            "endpoint, one request": lambda: post_rows(url, rows),
            f"endpoint, {step}-row requests": lambda: [
                post_rows(url, rows.iloc[i:i + step]) for i in range(0, len(rows), step)],
        }
        for name, fn in sides.items():
            _, seconds = timed(fn)
            best[name] = min(best.get(name, float("inf")), seconds)
    labels = [p["pred_label"] for p in post_rows(url, rows)]
    assert labels == run.predict(columns)["pred_label"].tolist(), "endpoint != predict.py"
    return best


def main(argv=None) -> None:
    import pandas as pd
    import torch

    args = parse_args(argv)
    rows = pd.read_parquet(SAMPLE).sample(args.rows, replace=args.rows > 4000, random_state=0)
    rows = rows.drop(columns=["acct_code"]).reset_index(drop=True)
    with tempfile.TemporaryDirectory() as work:
        run_dir, uri, run_id = train_and_log(args, work)
        proc, url, start_s = start_server(uri, run_id, work)
        try:
            best = measure(args, run_dir, url, rows, work)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
    base, cli = best["predict.py, model loaded"], best["predict.py CLI"]
    print(f"\nserve bench: {args.model}, {args.rows} rows, best of {args.repeats}, "
          f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}; server start to "
          f"/ping {start_s:.1f} s")
    print(f"  {'side':<30}{'seconds':>10}{'rows/s':>10}{'vs loaded':>12}{'vs CLI':>10}")
    for name, seconds in best.items():
        print(f"  {name:<30}{seconds:>10.2f}{args.rows / seconds:>10.0f}"
              f"{base / seconds:>11.2f}x{cli / seconds:>9.2f}x")
    print("  (ratios: rows/s of the side over predict.py's; the endpoint's labels equal "
          "predict.py's on these rows)")


if __name__ == "__main__":
    main()
