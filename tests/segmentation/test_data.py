"""The VOC-layout dataset's transforms as a training run and an evaluation meet them: torchvision's reference
crops (padded with 255 where the rescaled image is smaller), the flip applied to image and mask together,
and evaluation masks left at their own resolution."""
import random

import torch

from tests.data_fixtures import make_voc_segmentation
from wszoo.segmentation import IGNORE_INDEX, EvalTransform, TrainTransform, VOCSegmentation

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def test_training_crops_keep_image_and_mask_aligned_and_pad_with_ignore(tmp_path):
    root = make_voc_segmentation(tmp_path / "voc", n_train=4, n_val=2, size=40, num_classes=4)
    data = VOCSegmentation(str(root), "train", 4, TrainTransform(48, MEAN, STD))
    padded = False
    for seed in range(12):
        random.seed(seed)
        image, mask = data[seed % 4]
        assert image.shape == (3, 48, 48) and mask.shape == (48, 48) and mask.dtype == torch.int64
        assert set(mask.unique().tolist()) <= {0, 1, 2, 3, IGNORE_INDEX}
        raw = image * torch.tensor(STD)[:, None, None] + torch.tensor(MEAN)[:, None, None]
        labelled = (mask != IGNORE_INDEX)
        # the fixture's background is dark noise, its classes bright colours: the mask still says which is which
        bright = raw.max(0).values > 0.6
        agree = (bright == (mask > 0))[labelled & ~_edges(mask)].float().mean()
        assert agree > 0.97, (seed, agree)
        padded |= bool((~labelled).all(1).any())  # a whole row of 255: padding below a short rescale
    assert padded


def _edges(mask):
    """Pixels next to another label (bilinear and nearest resizing disagree there by a pixel)."""
    shifted = [mask.roll(s, d) for s in (1, -1) for d in (0, 1)]
    return torch.stack([mask != s for s in shifted]).any(0)


def test_evaluation_resizes_the_image_and_keeps_the_mask(tmp_path):
    root = make_voc_segmentation(tmp_path / "voc", n_train=2, n_val=2, size=40, num_classes=3)
    image, mask = VOCSegmentation(str(root), "val", 3, EvalTransform(20, MEAN, STD))[1]  # a 40x32 image
    assert tuple(image.shape) == (3, 20, 25) and tuple(mask.shape) == (32, 40)
    image, mask = VOCSegmentation(str(root), "val", 3, EvalTransform(None, MEAN, STD))[1]
    assert tuple(image.shape) == (3, 32, 40) and tuple(mask.shape) == (32, 40)
