"""predict.py and export.py on a real tiny run: per-row predictions in input order, output formats,
one-line errors for bad input, and a merged export that predicts like the adapter model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from helpers import ROOT, SMOKE, cli_env, run_train

PREDICT = ROOT / "src" / "lorasweep" / "predict.py"
EXPORT = ROOT / "src" / "lorasweep" / "export.py"
LEDGER = ROOT / "data" / "sample_ledger" / "ledger.parquet"
ATOL = 1e-6  # fp32 noise from padding a row in a batch versus running it alone

# One xdist worker runs the file: one trained run for all of its tests.
pytestmark = pytest.mark.xdist_group("trained_run")


def run_tool(script: Path, args, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), *args], cwd=cwd, env=cli_env(),
                          capture_output=True, text=True, timeout=600)


def error_lines(proc: subprocess.CompletedProcess):
    return [line for line in proc.stderr.splitlines() if line.startswith("lorasweep: error:")]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("predict_export")
    run = tmp / "run"
    # An absolute cache dir: predict/export rebuild the random base model from it, from any cwd.
    # A random head, plain CE (no label smoothing, which holds a random tiny model's outputs near
    # uniform) and a high learning rate: 6 steps move the head off its near-uniform init, so
    # rows get distinct scores (more collapse them onto one class). In fp32 (predict follows
    # the run's training.mixed_precision): these tests compare rows batched with others against
    # rows alone to 1e-6, and bf16 rounds a row's logits differently with a batch's padding.
    run_train([*SMOKE, "model.head_init=random", "lora=default", "loss=ce",
               "training.mixed_precision=no",
               "loss.label_smoothing=0", "training.learning_rate=0.05", "training.max_steps=6",
               f"hydra.run.dir={run}", f"data.cache_dir={tmp / 'cache'}"], check=True)
    return run


@pytest.fixture(scope="module")
def varied_input(trained_run) -> pd.DataFrame:
    """Ledger rows with descriptions from 1 to ~150 words (some past max_length), shuffled."""
    rows = pd.read_parquet(LEDGER).sample(48, random_state=7).reset_index(drop=True)
    rng = np.random.default_rng(0)
    repeats = rng.integers(0, 40, size=len(rows))
    rows["description"] = [d + " extra" * int(n)
                           for d, n in zip(rows["description"], repeats, strict=True)]
    return rows.sample(frac=1.0, random_state=3).reset_index(drop=True)


@pytest.fixture(scope="module")
def single_row_probabilities(trained_run, varied_input) -> np.ndarray:
    """Each row predicted alone (batch of one, no padding), through the training serializer."""
    from lorasweep.data.serialization import serialize_batch
    from lorasweep.runs.inference import predict_probabilities
    from lorasweep.runs.load import load_for_inference, run_serialization

    model, tokenizer, _, cfg = load_for_inference(str(trained_run))
    settings = run_serialization(str(trained_run), cfg)
    texts = serialize_batch(varied_input.to_dict(orient="list"), settings)
    return np.concatenate([predict_probabilities(model, tokenizer, [t], cfg.data.max_length)
                           for t in texts])


def read_output(path: Path) -> pd.DataFrame:
    if path.suffix == ".csv":
        return pd.read_csv(path, dtype={"acct_code": str, "pred_label": str, "top1_label": str,
                                        "top2_label": str, "top3_label": str})
    return pd.read_parquet(path)


@pytest.mark.slow
@pytest.mark.parametrize("ext", [".csv", ".parquet"])
def test_each_row_gets_its_own_prediction(ext, trained_run, varied_input,
                                          single_row_probabilities, tmp_path):
    source, out = tmp_path / "rows.parquet", tmp_path / f"preds{ext}"
    varied_input.to_parquet(source, index=False)
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    proc = run_tool(PREDICT, [f"run_dir={trained_run}", f"input={source}", f"output={out}",
                              "batch_size=8", "top_k=3"], workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "accuracy" in proc.stdout and "macro-F1" in proc.stdout
    assert list(workdir.iterdir()) == []  # no Hydra dir, log or cache left in the cwd
    preds = read_output(out)
    assert list(preds["vendor"]) == list(varied_input["vendor"])  # input order kept
    assert list(preds["description"]) == list(varied_input["description"])
    expected = single_row_probabilities
    # Rows differ from each other by far more than the tolerance, so a misplaced row would fail.
    separation = np.abs(expected[1:] - expected[:-1]).max(-1)
    assert np.median(separation) > 100 * ATOL, separation
    np.testing.assert_allclose(preds["top1_score"], expected.max(-1), atol=ATOL)
    np.testing.assert_allclose(preds["pred_score"], preds["top1_score"])
    second = np.sort(expected, axis=-1)[:, -2]
    np.testing.assert_allclose(preds["top2_score"], second, atol=ATOL)
    assert (preds["top1_score"] >= preds["top2_score"]).all()
    assert (preds["top2_score"] >= preds["top3_score"]).all()


@pytest.mark.slow
def test_missing_column_is_one_line_error_and_no_output(trained_run, tmp_path):
    source, out = tmp_path / "rows.csv", tmp_path / "preds.parquet"
    pd.read_parquet(LEDGER).head(10).drop(columns=["vendor"]).to_csv(source, index=False)
    proc = run_tool(PREDICT, [f"run_dir={trained_run}", f"input={source}", f"output={out}"],
                    tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = error_lines(proc)
    assert len(errors) == 1 and "vendor" in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.csv"]


@pytest.mark.slow
def test_export_predicts_like_the_adapter_model(trained_run, varied_input, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lorasweep.data.serialization import serialize_batch
    from lorasweep.runs.inference import predict_probabilities
    from lorasweep.runs.load import load_for_inference, run_serialization

    out = tmp_path / "exported"
    proc = run_tool(EXPORT, [f"run_dir={trained_run}", f"output={out}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (out / "adapter_config.json").exists()
    plain = AutoModelForSequenceClassification.from_pretrained(out)
    assert "Peft" not in type(plain).__name__ and plain.config.id2label[0] == "14100"
    model, tokenizer, _, cfg = load_for_inference(str(trained_run))
    texts = serialize_batch(varied_input.to_dict(orient="list"),
                            run_serialization(str(trained_run), cfg))
    expected = predict_probabilities(model, tokenizer, texts, cfg.data.max_length)
    got = predict_probabilities(plain.eval(), AutoTokenizer.from_pretrained(out), texts,
                                cfg.data.max_length)
    np.testing.assert_allclose(got, expected, atol=ATOL)

    again = run_tool(EXPORT, [f"run_dir={trained_run}", f"output={out}"])
    assert again.returncode == 2 and len(error_lines(again)) == 1, again.stderr[-3000:]
    assert "not an empty directory" in error_lines(again)[0]


def test_top_k_columns_are_sorted_and_clipped_to_the_label_count():
    from lorasweep.runs.inference import top_k_frame

    probs = np.array([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]])
    frame = top_k_frame(probs, ["a", "b", "c"], top_k=5)
    assert list(frame.columns) == ["pred_label", "pred_score", "top1_label", "top1_score",
                                   "top2_label", "top2_score", "top3_label", "top3_score"]
    assert list(frame["pred_label"]) == ["b", "a"] and list(frame["top3_label"]) == ["a", "b"]
    np.testing.assert_allclose(frame["top2_score"], [0.2, 0.3])


def test_label_metrics_count_unknown_labels_as_wrong():
    from lorasweep.runs.inference import label_metrics

    frame = pd.DataFrame({"y": ["a", "b", "zz", None], "pred_label": ["a", "a", "b", "b"]})
    metrics = label_metrics(frame, "y", ["a", "b"])
    assert metrics["rows"] == 3 and metrics["unknown_labels"] == 1
    assert metrics["accuracy"] == pytest.approx(1 / 3)
    assert label_metrics(frame.drop(columns=["y"]), "y", ["a", "b"]) is None


@pytest.mark.parametrize("ext", [".csv", ".parquet", ".jsonl"])
def test_write_table_round_trips_each_format(ext, tmp_path):
    from lorasweep.data.tables import write_table

    frame = pd.DataFrame({"text": ["x", "y, z"], "pred_label": ["1", "2"], "score": [0.5, 0.25]})
    path = tmp_path / f"out{ext}"
    write_table(frame, str(path))
    back = {".csv": lambda p: pd.read_csv(p, dtype={"pred_label": str}),
            ".parquet": pd.read_parquet,
            ".jsonl": lambda p: pd.read_json(p, lines=True, dtype={"pred_label": str})}[ext](path)
    pd.testing.assert_frame_equal(back, frame)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind


def copy_run_files(source: Path, target: Path, names) -> Path:
    import shutil

    target.mkdir()
    for name in names:
        copy = shutil.copytree if (source / name).is_dir() else shutil.copy
        copy(source / name, target / name)
    return target


@pytest.mark.slow
def test_a_run_killed_before_saving_is_refused_in_one_line(trained_run, tmp_path):
    unfinished = copy_run_files(trained_run, tmp_path / "unfinished",
                                ["config.yaml", "label_map.json", "tokenizer"])
    source = tmp_path / "rows.csv"
    pd.read_parquet(LEDGER).head(5).to_csv(source, index=False)
    for script, args in ((PREDICT, [f"input={source}", f"output={tmp_path / 'p.csv'}"]),
                         (EXPORT, [f"output={tmp_path / 'exported'}"])):
        proc = run_tool(script, [f"run_dir={unfinished}", *args])
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert error_lines(proc) == [
            f"lorasweep: error: run_dir={unfinished}: not a finished run: no run_complete.json "
            "and no adapter/ or model/: it stopped before saving its model; rerun its training "
            "command to finish it (it resumes from its last checkpoint)"]
        assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.csv", "unfinished"]


@pytest.mark.slow
def test_predict_max_length_past_the_model_is_one_line(trained_run, tmp_path):
    source, out = tmp_path / "rows.csv", tmp_path / "p.csv"
    pd.read_parquet(LEDGER).head(5).to_csv(source, index=False)
    proc = run_tool(PREDICT, [f"run_dir={trained_run}", f"input={source}", f"output={out}",
                              "max_length=100000"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "max_length=100000: the model takes at most 512 tokens" in error_lines(proc)[0]
    assert not out.exists()


@pytest.mark.slow
def test_a_failing_rerun_into_a_finished_run_leaves_it_unchanged(trained_run, tmp_path, run_dir,
                                                                  cache_dir):
    """A run dir's files describe the model in it: a rerun that fails before it has a new
    model rewrites none of them, and predict gives the same predictions as before."""
    names = ["config.yaml", "label_map.json", "dataset_metadata.json", "model_metadata.json",
             "metrics.json", "adapter", "tokenizer", "run_complete.json"]
    run = copy_run_files(trained_run, run_dir, names)
    before = {n: (run / n).read_bytes() for n in names if (run / n).is_file()}
    source = tmp_path / "rows.parquet"
    pd.read_parquet(LEDGER).head(20).to_parquet(source, index=False)
    first = run_tool(PREDICT, [f"run_dir={run}", f"input={source}",
                               f"output={tmp_path / 'first.parquet'}"])
    assert first.returncode == 0, first.stderr[-3000:]
    rerun = run_train([*SMOKE, "lora.target_modules=[nonexistent_module]",
                     "data.text_columns=[vendor]", f"hydra.run.dir={run}",
                     f"data.cache_dir={cache_dir}"])
    assert rerun.returncode == 2 and "lora.target_modules" in rerun.stderr, rerun.stderr[-3000:]
    assert {n: (run / n).read_bytes() for n in before} == before
    second = run_tool(PREDICT, [f"run_dir={run}", f"input={source}",
                                f"output={tmp_path / 'second.parquet'}"])
    assert second.returncode == 0, second.stderr[-3000:]
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "first.parquet"),
                                  pd.read_parquet(tmp_path / "second.parquet"))
