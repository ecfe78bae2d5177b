"""The row -> text contract: how one table row becomes the text the model reads.

Training tokenizes this text and predict.py serializes new rows with the same functions and the
settings saved with the run, so a change here changes what every saved run expects. Kept apart
from the data-preparation path so predict and export import only this, not the training readers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def format_value(value: Any) -> str | None:
    """Stable text for a cell: integers without '.0', floats in shortest round-trip form."""
    if value is None:
        return None
    if isinstance(value, float):
        if math.isnan(value):
            return None
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, (np.floating, np.integer)):
        return format_value(value.item())
    text = str(value).strip()
    return text if text else None


def serialize_row(row: dict[str, Any], columns: Sequence[str], separator: str = ", ",
                  include_column_names: bool = True, null_token: str | None = None) -> str:
    """One table row as text: "vendor: Staples, amount: 45.2". Missing values are skipped,
    or written as `null_token` when one is set. The same function runs at predict time."""
    parts = []
    for column in columns:
        text = format_value(row.get(column))
        if text is None:
            if null_token is None:
                continue
            text = null_token
        parts.append(f"{column}: {text}" if include_column_names else text)
    return separator.join(parts)


def serialization_settings(data_cfg, text_columns: Sequence[str]) -> dict[str, Any]:
    return {"text_columns": list(text_columns), "separator": data_cfg.separator,
            "include_column_names": data_cfg.include_column_names,
            "null_token": data_cfg.null_token}


def serialize_batch(batch: dict[str, list], settings: dict[str, Any]) -> list[str]:
    n = len(next(iter(batch.values())))
    columns = settings["text_columns"]
    return [serialize_row({c: batch[c][i] for c in columns}, columns, settings["separator"],
                          settings["include_column_names"], settings["null_token"])
            for i in range(n)]
