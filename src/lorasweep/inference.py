"""Batched prediction in length-sorted order, results returned in the input's order."""

from __future__ import annotations

from typing import List, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm


@torch.no_grad()
def predict_probabilities(model, tokenizer, texts: Sequence[str], max_length: int,
                          batch_size: int = 64, progress: bool = False) -> np.ndarray:
    """Class probabilities for `texts`, row i for text i.

    Texts are batched by token length (little padding, fast), then put back in input order.
    """
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    order = np.argsort([len(ids) for ids in encoded], kind="stable")
    device = next(model.parameters()).device
    probabilities: List[np.ndarray] = [None] * len(texts)  # type: ignore[list-item]
    batches = range(0, len(order), batch_size)
    for start in tqdm(batches, desc="predict", disable=not progress):
        idx = order[start:start + batch_size]
        batch = tokenizer.pad({"input_ids": [encoded[i] for i in idx]}, return_tensors="pt")
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
        for row, probs in zip(idx, torch.softmax(logits.float(), dim=-1).cpu().numpy()):
            probabilities[row] = probs
    return np.stack(probabilities) if probabilities else np.zeros((0, 0))
