"""The embedded default: shipped weights load by every route and reach the stated accuracy."""
import json
from pathlib import Path

import pytest
import torch

import wszoo
from wszoo.training.data import FASHION_MNIST_DIR

WEIGHTS = Path(wszoo.__file__).parent / "weights" / "resnet_mini_gn_ws.fmnist"
README = Path(__file__).resolve().parents[1] / "README.md"


def test_shipped_weights_load_by_tag_checkpoint_and_local_dir():
    a = wszoo.create_model("resnet_mini_gn_ws.fmnist", pretrained=True)
    b = wszoo.create_model("resnet_mini_gn_ws", checkpoint_path=str(WEIGHTS / "model.safetensors"))
    c = wszoo.create_model(f"local-dir:{WEIGHTS}", pretrained=True)
    assert a.in_chans == 1 and a.num_classes == 10
    for other in (b, c):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), other.state_dict().values(), strict=True))
    assert (WEIGHTS / "model.safetensors").stat().st_size < 5_000_000
    assert json.loads((WEIGHTS / "config.json").read_text())["architecture"] == "resnet_mini_gn_ws"


@pytest.mark.skipif(not Path(FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz").is_file(),
                    reason="Fashion-MNIST not installed (make test installs Debian's dataset-fashion-mnist)")
def test_embedded_default_accuracy_matches_readme(tmp_path):
    from wszoo.cli import main

    out = tmp_path / "r.json"
    assert main(["eval", "--model", "resnet_mini_gn_ws.fmnist", "--pretrained", "--dataset", "fashion-mnist",
                 "--split", "test", "-b", "500", "--results-file", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["num_samples"] == 10_000
    assert result["top1"] >= 90.0
    assert f"**{result['top1']:.2f}%** top-1" in README.read_text()
    cfg = wszoo.get_pretrained_cfg("resnet_mini_gn_ws.fmnist")
    assert cfg["top1"] == round(result["top1"], 2)
