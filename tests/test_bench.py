"""The benchmark scripts run end to end in their --tiny form and print their tables.

Only that they run: timings on a shared CI machine are noise, so nothing here asserts on them.
"""

import subprocess
import sys

import pytest

from helpers import ROOT, cli_env

pytestmark = pytest.mark.slow


def run_bench(script: str, *args) -> subprocess.CompletedProcess:
    # From the repo root, like the CLI: conf/data's relative data paths resolve against the cwd.
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--tiny", *args],
                          cwd=ROOT, env=cli_env(), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, f"{script} exited {proc.returncode}\n{proc.stdout[-3000:]}" \
                                 f"\n{proc.stderr[-5000:]}"
    return proc


def test_throughput_bench_prints_its_ratios_and_startup_split():
    out = run_bench("throughput.py").stdout
    for needle in ("(a) lorasweep / hand-written HF Trainer", "(b) dynamic+grouped",
                   "padded-token efficiency", "imports", "config", "data (cold cache)",
                   "model load + LoRA"):
        assert needle in out, out


def test_quality_bench_prints_every_system():
    out = run_bench("quality.py").stdout
    table = out[out.index("quality bench"):]
    for row in ("label-noise ceiling", "majority class", "TF-IDF + logistic regression",
                "frozen encoder + linear probe", "lorasweep defaults: model",
                "lorasweep defaults: blend"):
        line = next(x for x in table.splitlines() if x.strip().startswith(row))
        assert float(line.split()[-1]) >= 0.0, line  # a measured number, not "not run"
    assert "lorasweep sweep best" in table and "not run" in table


def test_quality_bench_takes_key_value_words_as_overrides_wherever_they_stand(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    from quality import parse_args

    args = parse_args(["--seeds", "42", "7", "training.num_train_epochs=5", "--datasets",
                       "debian", "lora.r=8"])
    assert args.seeds == [42, 7] and args.datasets == ["debian"]
    assert args.overrides == ["training.num_train_epochs=5", "lora.r=8"]


def test_gpu_bench_runs_its_variants_on_cpu():
    out = run_bench("gpu.py").stdout
    table = out[out.index("gpu bench: tiny"):]
    assert "tokens/s" in table and "MFU" in table, out
    rows = {(line[2:12].strip(), line[12:23].strip()): line[23:]
            for line in table.splitlines() if line.startswith("  ")}
    for variant in (("none", "no"), ("none", "yes"), ("zero3", "no")):  # measured
        assert float(rows[variant].split()[0]) > 0, out
    assert "skipped under --tiny" in rows[("zero2", "no")], out
    assert "DeepSpeedEngine" in table, out


def test_sweep_bench_prints_the_storage_overheads():
    out = run_bench("sweep.py", "--storage-only").stdout
    for kind in ("memory", "sqlite", "journal"):
        line = next(x for x in out.splitlines() if x.strip().startswith(kind))
        assert float(line.split()[1]) > 0, line  # ms per trial, measured
    writers = out[out.index("concurrent writers"):]
    assert "20 trials, 0 kinds of error" in writers, out  # 4 writers x 5 trials, none lost


def test_speed_bench_prints_training_and_evaluation_ratios():
    out = run_bench("eval_speed.py").stdout
    table = out[out.index("lorasweep speed bench"):]
    for needle in ("(a) training auto / fp32", "variable-length", "uniform", "fp32",
                   "(c) eval now (sorted+tokens, auto) / before (order, fp32)",
                   "(d) eval sorted, batches by tokens / by rows"):
        assert needle in table, out
    rows = [line for line in table.splitlines() if line.startswith("  (")]
    assert len(rows) == 9 and all(float(line[96:104]) > 0 for line in rows), table


def test_serve_bench_prints_rows_per_second_for_the_endpoint_and_predict_py():
    out = run_bench("serve.py").stdout
    table = out[out.index("serve bench: tiny_bert"):]
    for side in ("predict.py, model loaded", "predict.py CLI", "endpoint, one request",
                 "endpoint, 100-row requests"):
        line = next(x for x in table.splitlines() if x.strip().startswith(side))
        assert float(line.split()[-3]) > 0, line  # rows/s, measured
