"""Cold vs warm data preparation (read, split, label map, tokenization, diagnostics) on 50k rows.

    python bench/data_prep.py [--rows 50000] [--num-proc 2]

Builds the table from the shipped sample ledger (rows repeated with varied amounts) and, in one
process, times `prepare_data`:
  cold, num_proc=1   empty cache: everything is computed and the result is cached
  cold, num_proc=N   another empty cache, tokenization in N processes (datasets.map num_proc)
  warm               the first cache again: the whole prepared result is loaded
and, on its own, the tokenization step's rows/s. Prints the warm speed-up (target: >= 10x) and
the num_proc speed-up of the cold run.
"""

import argparse
import os
import tempfile
import time

import pandas as pd

from _common import ROOT, compose_train


def build_table(rows: int, path: str) -> None:
    sample = pd.read_parquet(ROOT / "data" / "sample_ledger" / "ledger.parquet")
    table = sample.sample(n=rows, replace=True, random_state=0).reset_index(drop=True)
    table["amount"] = (table["amount"] * (1 + (table.index % 97) / 1000)).round(2)
    table.to_parquet(path, index=False)


def data_config(path: str, cache_dir: str, num_proc: int):
    return compose_train(["data=files", f"data.train_path={path}", "data.label_column=acct_code",
                          f"data.cache_dir={cache_dir}", f"data.num_proc={num_proc}",
                          "output_dir=/unused"])


def timed(fn, *args, hf_cache=None):
    import datasets

    """Time one call; `hf_cache`: a fresh datasets cache, so nothing from an earlier run is reused
    (load_dataset's Arrow copy of the parquet file, map's cache files)."""
    if hf_cache:
        datasets.config.HF_DATASETS_CACHE = hf_cache
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def main() -> None:
    import datasets
    from transformers import AutoTokenizer

    from lorasweep.data.prepare import prepare_data, tokenize_splits

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--num-proc", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rows.parquet")
        build_table(args.rows, path)
        serial = data_config(path, f"{tmp}/cache1", 1)
        parallel = data_config(path, f"{tmp}/cache{args.num_proc}", args.num_proc)
        tokenizer = AutoTokenizer.from_pretrained(serial.model.name_or_path)
        prepared, cold = timed(prepare_data, serial.data, tokenizer, hf_cache=f"{tmp}/hf1")
        _, cold_parallel = timed(prepare_data, parallel.data, tokenizer, hf_cache=f"{tmp}/hf2")
        _, warm = timed(prepare_data, serial.data, tokenizer)
        datasets.disable_caching()  # tokenize again for real, not from map's cache file
        _, tokenize = timed(tokenize_splits, prepared.raw, tokenizer, prepared.label_map,
                            serial.data, prepared.serialization)
    print(f"\n{args.rows} rows: cold {cold:.2f} s, warm {warm:.2f} s, warm speed-up "
          f"{cold / warm:.1f}x (target >= 10x: {'met' if cold / warm >= 10 else 'NOT met'})")
    print(f"cold with num_proc={args.num_proc}: {cold_parallel:.2f} s "
          f"({cold / cold_parallel:.2f}x the num_proc=1 cold run; {os.cpu_count()} CPUs)")
    print(f"tokenization alone (num_proc=1): {tokenize:.2f} s, {args.rows / tokenize:,.0f} rows/s; "
          f"cold preparation {args.rows / cold:,.0f} rows/s")


if __name__ == "__main__":
    main()
