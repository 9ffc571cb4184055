"""``wszoo data mosaic``: the set a user makes, checked with pycocotools (not ours), against its own VOC masks, by
wszoo's detection dataset, against the Fashion-MNIST items it says it took, byte for byte across runs, and its
refusals as the command line gives them."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from tests.data_fixtures import make_fashion_mnist
from tests.helpers import run_cli, tree_snapshot
from wszoo.detection.coco import CocoDetection
from wszoo.tools.mosaic import SILHOUETTE_THRESHOLD, write_mosaic
from wszoo.training.data import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, FashionMNIST

SPLITS = ("train", "val")


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory) -> str:
    """Debian's Fashion-MNIST where installed, else a small stand-in in its layout."""
    if Path(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz").is_file():
        return FASHION_MNIST_DIR
    return str(make_fashion_mnist(tmp_path_factory.mktemp("fm"), n_train=200, n_test=100))


@pytest.fixture(scope="module")
def mosaic(fmnist, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mosaic") / "set"
    write_mosaic(out, train=12, val=6, size=64, seed=0, data_dir=fmnist)
    return out


def _coco(root: Path, split: str) -> COCO:
    return COCO(str(root / "annotations" / f"instances_{split}.json"))


@pytest.mark.parametrize("split", SPLITS)
def test_ground_truth_scored_against_itself_is_ap_100(mosaic, split):
    coco = _coco(mosaic, split)
    assert [c["name"] for c in coco.loadCats(sorted(coco.getCatIds()))] == FASHION_MNIST_CLASSES
    assert sorted(coco.getCatIds()) == list(range(1, 11))
    assert len(coco.getImgIds()) == (12 if split == "train" else 6)
    assert all((mosaic / "JPEGImages" / img["file_name"]).is_file() for img in coco.dataset["images"])
    assert len(coco.getAnnIds()) >= len(coco.getImgIds())  # every canvas holds at least one item
    for kind, field in (("bbox", "bbox"), ("segm", "segmentation")):
        found = [{"image_id": a["image_id"], "category_id": a["category_id"], "score": 1.0, field: a[field]}
                 for a in coco.dataset["annotations"]]
        evaluator = COCOeval(coco, coco.loadRes(found), kind)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        assert evaluator.stats[0] == pytest.approx(1.0), kind  # AP over IoU 0.5:0.95
        assert evaluator.stats[1] == pytest.approx(1.0), kind


@pytest.mark.parametrize("split", SPLITS)
def test_voc_masks_agree_with_the_coco_masks(mosaic, split):
    coco = _coco(mosaic, split)
    ids = (mosaic / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()
    assert ids == [img["file_name"][:-4] for img in coco.loadImgs(sorted(coco.getImgIds()))]
    for image_id, name in zip(sorted(coco.getImgIds()), ids, strict=True):
        png = Image.open(mosaic / "SegmentationClass" / f"{name}.png")
        assert png.mode == "P" and png.size == (64, 64)
        with Image.open(mosaic / "JPEGImages" / f"{name}.jpg") as jpg:
            assert (jpg.mode, jpg.size) == ("RGB", (64, 64))
        classes = np.asarray(png)
        labelled = np.zeros_like(classes, dtype=bool)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=image_id)):
            mask = coco.annToMask(ann).astype(bool)
            assert not (mask & labelled).any(), "the visible parts of two items overlap"
            assert (classes[mask] == ann["category_id"]).all()
            assert ann["area"] == mask.sum() and ann["iscrowd"] == 0
            assert ann["bbox"] == mask_utils.toBbox(mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
                                                    ).tolist()  # the tight box of the visible silhouette
            labelled |= mask
        assert ((classes > 0) == labelled).all() and classes.max() <= 10


def test_wszoo_detection_dataset_loads_it(mosaic):
    dataset = CocoDetection(str(mosaic / "JPEGImages"), str(mosaic / "annotations" / "instances_train.json"),
                            masks=True)
    assert dataset.num_classes == 11 and dataset.classes == FASHION_MNIST_CLASSES
    image, target = dataset[0]
    assert image.shape == (3, 64, 64)
    n = len(target["labels"])
    assert n >= 1 and target["masks"].shape == (n, 64, 64) and target["boxes"].shape == (n, 4)
    first = dataset.coco.imgToAnns[dataset.ids[0]][0]
    assert target["labels"][0] == first["category_id"]  # categories 1..10 map to labels 1..10


@pytest.mark.parametrize("split, source_split", [("train", "train"), ("val", "test")])
def test_items_are_the_fashion_mnist_items_of_their_split(mosaic, fmnist, split, source_split):
    """Each annotation names its item (split, index, the square it was scaled into): its label is that item's,
    its mask lies in that item's silhouette, and the canvas shows that item's pixels there."""
    source = FashionMNIST(fmnist, source_split)
    other = FashionMNIST(fmnist, "test" if source_split == "train" else "train")
    coco = _coco(mosaic, split)
    differences = {"named": [], "other split": []}
    for ann in coco.dataset["annotations"]:
        origin = ann["fashion_mnist"]
        assert origin["split"] == source_split
        assert ann["category_id"] == source.targets[origin["index"]] + 1
        x, y, side = origin["placed"]
        mask = coco.annToMask(ann).astype(bool)
        with Image.open(mosaic / "JPEGImages" / coco.imgs[ann["image_id"]]["file_name"]) as jpg:
            brightest = np.asarray(jpg).max(axis=2)[y:y + side, x:x + side].astype(float)
        for key, images in (("named", source.images), ("other split", other.images)):
            item = images[origin["index"] % len(images)]  # (the test split is the smaller)
            scaled = np.asarray(Image.fromarray(item).resize((side, side), Image.BILINEAR))
            if key == "named":
                assert not mask[y:y + side, x:x + side][scaled < SILHOUETTE_THRESHOLD].any()
                assert mask.sum() == mask[y:y + side, x:x + side].sum()
            visible = mask[y:y + side, x:x + side]
            differences[key].append(np.abs(brightest[visible] - scaled[visible]).mean())
    # the item's brightest channel is its grey level (the tint's largest channel is 1), up to JPEG's error
    assert np.mean(differences["named"]) < 8 < np.mean(differences["other split"])


def test_same_arguments_same_bytes(mosaic, fmnist, tmp_path):
    again = tmp_path / "again"
    write_mosaic(again, train=12, val=6, size=64, seed=0, data_dir=fmnist)
    assert tree_snapshot(again) == tree_snapshot(mosaic)
    fewer = tmp_path / "fewer"  # the first canvases of a split do not depend on how many are asked for
    write_mosaic(fewer, train=4, val=6, size=64, seed=0, data_dir=fmnist)
    assert all(tree_snapshot(fewer)[f"JPEGImages/train_{n:06d}.jpg"] == tree_snapshot(mosaic)[
        f"JPEGImages/train_{n:06d}.jpg"] for n in range(4))
    assert tree_snapshot(fewer)["annotations/instances_val.json"] == tree_snapshot(mosaic)[
        "annotations/instances_val.json"]
    other = tmp_path / "other"
    write_mosaic(other, train=12, val=6, size=64, seed=1, data_dir=fmnist)
    assert tree_snapshot(other)["JPEGImages/train_000000.jpg"] != tree_snapshot(mosaic)["JPEGImages/train_000000.jpg"]
    summary = json.loads((mosaic / "mosaic.json").read_text())
    assert summary["parameters"]["seed"] == 0 and summary["counts"]["val"]["fashion_mnist_split"] == "test"
    assert set(summary["source_files"]) == {"train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                                            "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"}
    assert summary["counts"]["train"]["instances"] == len(_coco(mosaic, "train").getAnnIds())


def test_the_command_writes_a_set_and_refuses_what_it_cannot_do(fmnist, tmp_path):
    out = tmp_path / "set"
    args = ["data", "mosaic", "-o", str(out), "--train", "3", "--val", "2", "--size", "48", "--data-dir", fmnist]
    code, printed, err = run_cli(args)
    assert code == 0, err
    assert "train: 3 images" in printed and "val: 2 images" in printed
    assert len(list((out / "JPEGImages").glob("*.jpg"))) == 5
    before = tree_snapshot(out)
    code, _, err = run_cli(args)  # a second run into the full folder
    assert code == 2 and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert tree_snapshot(out) == before
    code, _, err = run_cli([*args, "--seed", "3", "--overwrite"])
    assert code == 0, err
    assert json.loads((out / "mosaic.json").read_text())["parameters"]["seed"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]  # no staging folder left beside it
    for bad, words in ((["--train", "0"], "--train must be >= 1"), (["--size", "16"], "--size must be >= 32"),
                       (["--data-dir", str(tmp_path / "none")], "dataset-fashion-mnist")):
        code, _, err = run_cli(["data", "mosaic", "-o", str(tmp_path / "new"), "--train", "3", "--val", "2",
                                "--data-dir", fmnist, *bad])
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "new").exists()
    assert "--data-dir" in err


def test_an_interrupted_write_leaves_nothing(fmnist, tmp_path, monkeypatch):
    saves = []

    def failing_save(self, *args, **kwargs):
        saves.append(1)
        if len(saves) == 5:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    original = Image.Image.save
    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(KeyboardInterrupt):
        write_mosaic(tmp_path / "set", train=4, val=2, size=48, data_dir=fmnist)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="train must be an integer >= 1"):
        write_mosaic(tmp_path / "set", train=True, val=2)
