"""The confusion matrix and the figures made from it: against a count done by hand and against torchvision's
segmentation reference (``references/segmentation/utils.py``: ``ConfusionMatrix.update`` and ``compute``),
written out here on its own in NumPy."""
import numpy as np
import pytest
import torch

from wszoo.segmentation import confusion_matrix, segmentation_metrics


def test_a_small_case_counted_by_hand():
    target = torch.tensor([[0, 0, 1, 255],
                           [2, 1, 1, 2]])
    prediction = torch.tensor([[0, 1, 1, 2],
                               [2, 1, 0, 0]])
    matrix = confusion_matrix(target, prediction, 3)
    # rows: the label, columns: the prediction; the 255 pixel counts nowhere
    assert matrix.tolist() == [[1, 1, 0],
                               [1, 2, 0],
                               [1, 0, 1]]
    metrics = segmentation_metrics(matrix)
    assert metrics["pixels"] == 7
    assert metrics["pixel_acc"] == pytest.approx(100 * 4 / 7)
    # IoU = diagonal / (row + column - diagonal): class 0: 1 / (2 + 3 - 1), 1: 2 / (3 + 3 - 2), 2: 1 / (2 + 1 - 1)
    assert metrics["IoU"] == pytest.approx([25.0, 50.0, 50.0])
    assert metrics["mIoU"] == pytest.approx(125 / 3)


def test_a_class_nobody_has_is_left_out_of_the_mean():
    target, prediction = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 1, 1])
    metrics = segmentation_metrics(confusion_matrix(target, prediction, 4))
    assert metrics["IoU"][2:] == [None, None]
    assert metrics["mIoU"] == pytest.approx(100 * (1 / 2 + 2 / 3) / 2)


def _torchvision_reference(targets, predictions, n):
    """torchvision's ConfusionMatrix: per image, ``k = (a >= 0) & (a < n)``, ``bincount(n * a[k] + b[k])``;
    then ``acc_global = diag.sum() / h.sum()``, ``iu = diag / (h.sum(1) + h.sum(0) - diag)``."""
    mat = np.zeros((n, n), dtype=np.int64)
    for a, b in zip(targets, predictions, strict=True):
        a, b = a.reshape(-1), b.reshape(-1)
        k = (a >= 0) & (a < n)
        mat += np.bincount(n * a[k] + b[k], minlength=n ** 2).reshape(n, n)
    h = mat.astype(np.float64)
    return mat, np.diag(h).sum() / h.sum(), np.diag(h) / (h.sum(1) + h.sum(0) - np.diag(h))


def test_random_labels_with_ignored_pixels_match_torchvision_s_reference():
    rng = np.random.default_rng(0)
    n = 6
    targets = [rng.integers(0, n, (17, 23)) for _ in range(5)]
    for t in targets:
        t[rng.random(t.shape) < 0.1] = 255
    predictions = [np.where(rng.random(t.shape) < 0.6, np.clip(t, 0, n - 1), rng.integers(0, n, t.shape))
                   for t in targets]
    reference, acc, iou = _torchvision_reference(targets, predictions, n)
    ours = sum(confusion_matrix(torch.from_numpy(t), torch.from_numpy(p), n)
               for t, p in zip(targets, predictions, strict=True))
    assert ours.tolist() == reference.tolist()
    assert 0 < ours.sum() < sum(t.size for t in targets)  # the ignored pixels were there, and left out
    metrics = segmentation_metrics(ours)
    assert metrics["pixel_acc"] == pytest.approx(100 * acc)
    assert metrics["IoU"] == pytest.approx(list(100 * iou))
    assert metrics["mIoU"] == pytest.approx(100 * iou.mean())
