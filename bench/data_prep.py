"""Cold vs warm data preparation (split, label map, tokenization cache) on a 50k-row table.

    python bench/data_prep.py [--rows 50000]

Builds the table from the shipped sample ledger (rows repeated with varied amounts), runs
`prepare_data` twice in one process with a fresh cache dir: the first run tokenizes, the second is
a cache hit. Prints both times, their ratio (target: warm >= 10x faster) and tokenization rows/s.
"""

import argparse
import os
import sys
import tempfile
import time

import pandas as pd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))

from hydra import compose, initialize_config_dir  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

import lorasweep.config  # noqa: E402,F401  (registers the schemas)
from lorasweep.data import prepare_data  # noqa: E402


def build_table(rows: int, path: str) -> None:
    sample = pd.read_parquet(os.path.join(ROOT, "data/sample_ledger/ledger.parquet"))
    table = sample.sample(n=rows, replace=True, random_state=0).reset_index(drop=True)
    table["amount"] = (table["amount"] * (1 + (table.index % 97) / 1000)).round(2)
    table.to_parquet(path, index=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rows.parquet")
        build_table(args.rows, path)
        with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base="1.3"):
            cfg = compose(config_name="train", overrides=[
                "data=files", f"data.train_path={path}", "data.label_column=acct_code",
                f"data.cache_dir={tmp}/cache", "output_dir=/unused"])
        tokenizer = AutoTokenizer.from_pretrained(cfg.model.name_or_path)
        times = []
        for _ in range(2):
            start = time.perf_counter()
            prepare_data(cfg.data, tokenizer)
            times.append(time.perf_counter() - start)
    cold, warm = times
    print(f"\n{args.rows} rows: cold {cold:.2f} s, warm {warm:.2f} s, warm speed-up "
          f"{cold / warm:.1f}x (target >= 10x: {'met' if cold / warm >= 10 else 'NOT met'}); "
          f"cold preparation {args.rows / cold:,.0f} rows/s")


if __name__ == "__main__":
    main()
