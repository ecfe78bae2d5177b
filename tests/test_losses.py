"""Class weights on known counts; loss equivalences; gradient accumulation normalisation."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lorasweep.model.losses import ClassificationLoss, class_weights


def test_class_weights_on_known_counts():
    # counts 8, 2, 0 -> frequency (0.8, 0.2, 0.1 with the floor of one row) of 10 rows
    labels = [0] * 8 + [1] * 2
    w = class_weights(labels, num_labels=3, alpha=1.0, weight_min=0.1, weight_max=100.0)
    raw = np.array([10 / 8, 10 / 2, 10 / 1])
    np.testing.assert_allclose(w, raw / raw.mean())
    assert w.mean() == pytest.approx(1.0)


def test_class_weights_power_clip_and_mean_one():
    labels = [0] * 90 + [1] * 9 + [2] * 1
    w = class_weights(labels, 3, alpha=0.5, weight_min=1.5, weight_max=5.0)
    raw = np.clip((100 / np.array([90, 9, 1])) ** 0.5, 1.5, 5.0)  # 1.054->1.5, 3.33, 10->5
    np.testing.assert_allclose(w, raw / raw.mean())
    np.testing.assert_allclose(class_weights(labels, 3, 0.5, 0.1, 10, enabled=False), [1, 1, 1])


def _batch(seed=0, n=12, k=5):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=gen), torch.randint(0, k, (n,), generator=gen)


def test_weighted_ce_with_uniform_weights_equals_ce():
    logits, labels = _batch()
    plain = ClassificationLoss("ce")({"logits": logits}, labels)
    uniform = ClassificationLoss("ce", weights=np.ones(5))({"logits": logits}, labels)
    assert torch.allclose(plain, uniform)
    assert torch.allclose(plain, F.cross_entropy(logits, labels))


def test_focal_with_gamma_zero_equals_ce():
    logits, labels = _batch(1)
    focal = ClassificationLoss("focal", gamma=0.0)({"logits": logits}, labels)
    assert torch.allclose(focal, F.cross_entropy(logits, labels), atol=1e-6)


def test_label_smoothing_matches_torch():
    logits, labels = _batch(2)
    smoothed = ClassificationLoss("ce", label_smoothing=0.1)({"logits": logits}, labels)
    assert torch.allclose(smoothed, F.cross_entropy(logits, labels, label_smoothing=0.1))


def test_focal_smooths_its_targets_like_ce():
    """Label smoothing is not ignored under loss=focal: with gamma 0 it is smoothed CE, and with
    gamma > 0 it still changes the loss."""
    logits, labels = _batch(4)
    smoothed = ClassificationLoss("focal", gamma=0.0, label_smoothing=0.1)({"logits": logits},
                                                                          labels)
    assert torch.allclose(smoothed, F.cross_entropy(logits, labels, label_smoothing=0.1),
                          atol=1e-6)
    focal = ClassificationLoss("focal", gamma=2.0)
    focal_smoothed = ClassificationLoss("focal", gamma=2.0, label_smoothing=0.1)
    assert not torch.allclose(focal({"logits": logits}, labels),
                              focal_smoothed({"logits": logits}, labels))


def test_accumulated_micro_batches_sum_to_the_full_batch_loss():
    """With num_items_in_batch (what the Trainer passes under accumulation), the micro-batch
    losses add up to the full batch's mean loss, weighted or not."""
    logits, labels = _batch(3, n=12)
    for loss in (ClassificationLoss("ce"), ClassificationLoss("ce", weights=np.arange(1, 6) / 3)):
        full = loss({"logits": logits}, labels, num_items_in_batch=12)
        parts = sum(loss({"logits": logits[i:i + 4]}, labels[i:i + 4], num_items_in_batch=12)
                    for i in range(0, 12, 4))
        assert torch.allclose(full, parts)
    assert torch.allclose(ClassificationLoss("ce")({"logits": logits}, labels, 12),
                          F.cross_entropy(logits, labels))
