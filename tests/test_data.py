"""Dataset readers: Fashion-MNIST idx files, ImageFolder trees, and their errors."""
import numpy as np
import pytest

from tests.data_fixtures import make_fashion_mnist, make_image_folder, write_idx
from wszoo.training.data import DataError, FashionMNIST, create_dataset


def test_fashion_mnist_reader(tmp_path):
    root = make_fashion_mnist(tmp_path / "fm", n_train=20, n_test=7)
    train, test = FashionMNIST(str(root), "train"), FashionMNIST(str(root), "test")
    assert len(train) == 20 and len(test) == 7
    img, label = train[3]
    assert img.mode == "L" and img.size == (28, 28) and 0 <= label < 10
    assert np.asarray(img)[2 * label + 1].min() == 220  # the class band written by the fixture
    assert FashionMNIST(str(root), "train", mode="RGB")[0][0].mode == "RGB"
    assert len(FashionMNIST(str(root), "train", limit=5)) == 5


def test_fashion_mnist_errors(tmp_path):
    with pytest.raises(DataError, match="no train-images-idx3-ubyte"):
        FashionMNIST(str(tmp_path), "train")
    with pytest.raises(DataError, match="splits 'train' and 'test'"):
        FashionMNIST(str(tmp_path), "dev")
    root = make_fashion_mnist(tmp_path / "fm", n_train=10, n_test=4)
    write_idx(root / "train-labels-idx1-ubyte.gz", np.zeros(9))
    with pytest.raises(DataError, match="disagree: 10 images, 9 labels"):
        FashionMNIST(str(root), "train")
    (root / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b junk")
    with pytest.raises(DataError, match="cannot read|not an unsigned-byte idx"):
        FashionMNIST(str(root), "test")


def test_image_folder_splits_modes_and_errors(tmp_path):
    root = make_image_folder(tmp_path / "if", splits=("train", "val"))
    val = create_dataset("imagefolder", str(root), "val", in_chans=1)
    assert val.classes == ["a", "b", "c"] and len(val) == 12 and val[0][0].mode == "L"
    flat = make_image_folder(tmp_path / "flat")
    assert len(create_dataset("imagefolder", str(flat), "val")) == 12  # no split folder: the root itself
    with pytest.raises(DataError, match="does not exist"):
        create_dataset("imagefolder", str(tmp_path / "missing"), "val")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match="empty"):
        create_dataset("imagefolder", str(tmp_path / "empty"), "val")
    with pytest.raises(DataError, match="unknown dataset 'nope'"):
        create_dataset("nope", str(root), "val")
