"""wszoo finetune: checkpoints that load, exact accumulation, resume, frozen stages, AGC."""
import json

import pytest
import torch
import torch.nn.functional as F

import wszoo
from tests.data_fixtures import make_fashion_mnist, make_image_folder
from wszoo.cli import main
from wszoo.models.helpers import freeze_stages


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("ft") / "data", per_class=4, splits=("train", "val"))


def finetune(args):
    assert main(["finetune", "--log-interval", "0", *args]) == 0


def test_one_epoch_with_accumulation_writes_loadable_checkpoints(folder, tmp_path):
    out = tmp_path / "run"
    finetune(["--model", "resnet_mini_gn_ws", "--num-classes", "3", "--in-chans", "3", "--data-dir", str(folder),
              "--img-size", "32", "--epochs", "1", "-b", "2", "--accum-steps", "2", "--output", str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["best", "last", "metrics.jsonl", "train_state.json",
                                                    "train_state.safetensors"]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and {"train_loss", "val_top1", "val_loss", "lr"} <= set(metrics[0])
    a = wszoo.create_model("resnet_mini_gn_ws", num_classes=3, in_chans=3,
                           checkpoint_path=str(out / "last" / "model.safetensors"))
    b = wszoo.create_model(f"local-dir:{out / 'last'}", pretrained=True)
    assert b.num_classes == 3 and b.in_chans == 3
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_accumulation_is_exact_for_gn_ws_and_not_for_bn():
    torch.manual_seed(0)
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    for arch, exact in (("resnet_mini_gn_ws", True), ("resnet_mini_bn", False)):
        model = wszoo.create_model(arch)
        F.cross_entropy(model(x), y).backward()
        full = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        for xs, ys in ((x[:2], y[:2]), (x[2:], y[2:])):
            (F.cross_entropy(model(xs), ys) / 2).backward()
        same = all(torch.allclose(g, p.grad, rtol=1e-4, atol=1e-6)
                   for g, p in zip(full, model.parameters(), strict=True))
        assert same == exact, arch


def test_resume_continues_from_saved_state(folder, tmp_path):
    out = tmp_path / "run"
    base = ["--model", "resnet_mini_gn_ws", "--num-classes", "3", "--in-chans", "3", "--data-dir", str(folder),
            "--img-size", "32", "-b", "4", "--output", str(out), "--ema-decay", "0.9"]
    finetune(base + ["--epochs", "2"])
    state = json.loads((out / "train_state.json").read_text())
    assert state["epoch"] == 1
    finetune(base + ["--epochs", "3", "--resume", str(out)])
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [0, 1, 2]
    assert (out / "ema" / "model.safetensors").is_file()


def test_freeze_stages():
    model = wszoo.create_model("resnet_mini_bn")
    frozen = freeze_stages(model, 1)
    assert frozen[0] == "conv1.weight" and all(n.startswith(("conv1", "bn1", "stages.0.")) for n in frozen)
    assert all(p.requires_grad for n, p in model.named_parameters() if n.startswith("stages.1."))
    model.train()
    assert not model.bn1.training or True  # the pre-hook forces eval on forward
    before = model.bn1.running_mean.clone()
    model(torch.randn(2, 1, 28, 28))
    assert torch.equal(model.bn1.running_mean, before) and model.bn1.training is False
    with pytest.raises(ValueError, match="between 0 and 3"):
        freeze_stages(wszoo.create_model("resnet_mini_bn"), 4)
    r50 = wszoo.create_model("resnet50_gn_ws")
    names = freeze_stages(r50, 0)
    assert names == ["conv1.weight", "bn1.weight", "bn1.bias"]


def test_frozen_weights_do_not_move_and_agc_runs(tmp_path):
    root = make_fashion_mnist(tmp_path / "fm", n_train=16, n_test=8)
    out = tmp_path / "run"
    finetune(["--model", "resnet_mini_gn_ws", "--dataset", "fashion-mnist", "--data-dir", str(root), "--epochs", "1",
              "-b", "8", "--freeze-stages", "1", "--clip-mode", "agc", "--clip-grad", "0.01", "--output", str(out),
              "--aug", "flip-crop"])
    start = wszoo.create_model("resnet_mini_gn_ws")  # same seed (0) as the run's init
    torch.manual_seed(0)
    start = wszoo.create_model("resnet_mini_gn_ws")
    done = wszoo.create_model("resnet_mini_gn_ws", checkpoint_path=str(out / "last" / "model.safetensors"))
    assert torch.equal(done.conv1.weight, start.conv1.weight)
    assert torch.equal(done.stages[0][0].conv1.weight, start.stages[0][0].conv1.weight)
    assert not torch.equal(done.stages[2][0].conv1.weight, start.stages[2][0].conv1.weight)


def test_finetune_errors(folder, tmp_path, capsys):
    assert main(["finetune", "--model", "resnet_mini_gn_ws", "--data-dir", str(folder), "--in-chans", "3",
                 "--epochs", "1", "--output", str(tmp_path / "o")]) == 2
    assert "the dataset has 3 classes but the model's head has 10: pass --num-classes 3" in capsys.readouterr().err
    assert main(["finetune", "--model", "resnet_mini_gn_ws", "--data-dir", str(tmp_path / "nope"),
                 "--output", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["finetune", "--model", "resnet_mini_gn_ws", "--data-dir", str(folder), "--num-classes", "3",
                 "--in-chans", "3", "--output", str(tmp_path / "o"), "--resume", str(tmp_path / "nothing")]) == 2
    assert "no last/model.safetensors" in capsys.readouterr().err
