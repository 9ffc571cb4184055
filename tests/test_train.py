"""wszoo finetune: checkpoints that load, exact accumulation, resume, frozen stages, AGC."""
import json

import pytest
import torch
import torch.nn.functional as F

import wszoo
from tests.data_fixtures import make_fashion_mnist, make_image_folder
from tests.helpers import child_log
from wszoo.cli import main
from wszoo.features import freeze_stages


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
    assert len(metrics) == 1
    assert {"train_loss", "val_top1", "val_loss", "lr", "train_seconds", "val_seconds"} <= set(metrics[0])
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


# --- DDP micro-batches: docs/training.md's recipe under torch.distributed.run -----------------------------
REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def _weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "last" / "model.safetensors"))


@pytest.fixture(scope="module")
def eight_images(tmp_path_factory):
    return make_fashion_mnist(tmp_path_factory.mktemp("ddp") / "fm", n_train=8, n_test=4)


@pytest.fixture(scope="module")
def single_process_step(eight_images, tmp_path_factory):
    """One optimizer step over all 8 images in one process: 4 micro-batches of 2."""
    out = tmp_path_factory.mktemp("single") / "run"
    finetune(["--model", "resnet_mini_gn_ws", "--dataset", "fashion-mnist", "--data-dir", str(eight_images),
              "--epochs", "1", "-b", "2", "--accum-steps", "4", "--aug", "none", "--lr", "0.5", "--output", str(out)])
    return _weights(out)


@pytest.mark.parametrize("accumulate_ws", [True, False])
def test_ddp_micro_batches_give_the_single_process_gradients(eight_images, single_process_step, tmp_path,
                                                             accumulate_ws):
    """2 processes x 2 micro-batches of 2 images = one step over the same 8 images as 1 process x 4 x 2:
    after that step (lr 0.5, so the gradient dominates the change) the weights agree to float rounding."""
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "wszoo",
           "finetune", "--model", "resnet_mini_gn_ws", "--dataset", "fashion-mnist", "--data-dir", str(eight_images),
           "--epochs", "1", "-b", "2", "--accum-steps", "2", "--aug", "none", "--lr", "0.5", "--log-interval", "0",
           "--output", str(out)] + ([] if accumulate_ws else ["--no-accumulate-ws"])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, child_log(proc)
    metrics_lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(metrics_lines) == 1, proc.stdout  # rank 0 prints the final metrics, once
    assert json.loads(metrics_lines[0])["epoch"] == 0
    ddp = _weights(out)
    start = wszoo.create_model("resnet_mini_gn_ws").state_dict()  # seed 0: rank 0's init, broadcast by DDP
    torch.manual_seed(0)
    start = wszoo.create_model("resnet_mini_gn_ws").state_dict()
    for key, value in single_process_step.items():
        moved = (value - start[key]).abs().max()
        # 1e-5 of the step, but never finer than float32 can tell apart at the value (a GroupNorm weight
        # near 1.0 moved by 4e-3 rounds to the same few ulps whichever order the two ranks' sums take)
        resolution = 4 * torch.finfo(torch.float32).eps * value.abs().max().item()
        assert (ddp[key] - value).abs().max() <= max(1e-5 * max(moved.item(), 1e-3), resolution), key
    assert any((v - start[k]).abs().max() > 1e-3 for k, v in single_process_step.items()), "the step moved nothing"


# --- output directories, interruption and divergence -----------------------------------------------------
def _tiny_run_args(data, out, *extra):
    return ["finetune", "--model", "resnet_mini_gn_ws", "--dataset", "fashion-mnist", "--data-dir", str(data),
            "-b", "8", "--aug", "none", "--log-interval", "0", "--output", str(out), *extra]


def test_an_existing_run_is_refused_resumed_or_replaced(eight_images, tmp_path):
    from tests.helpers import run_cli, tree_snapshot

    out = tmp_path / "run"
    assert run_cli(_tiny_run_args(eight_images, out, "--epochs", "2"))[0] == 0
    before = tree_snapshot(out)
    code, _, err = run_cli(_tiny_run_args(eight_images, out, "--epochs", "2"))
    assert code == 2 and len(err.splitlines()) == 1
    assert f"--output {out} already holds a training run (epochs 0..1 of resnet_mini_gn_ws)" in err
    assert f"pass --resume {out}" in err and "--overwrite" in err
    assert tree_snapshot(out) == before, "a refused run must not touch the directory"

    assert run_cli(_tiny_run_args(eight_images, out, "--epochs", "3", "--resume", str(out)))[0] == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2]

    assert run_cli(_tiny_run_args(eight_images, out, "--epochs", "1", "--overwrite"))[0] == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0] and json.loads((out / "train_state.json").read_text())["epoch"] == 0


def test_resume_with_other_settings_is_refused(eight_images, tmp_path):
    from tests.helpers import run_cli, tree_snapshot

    out = tmp_path / "run"
    assert run_cli(_tiny_run_args(eight_images, out, "--epochs", "1"))[0] == 0
    before = tree_snapshot(out)
    for extra, message in [
        (["--epochs", "2", "--opt", "adamw"], "that run used --opt sgd"),
        (["--epochs", "1"], "epochs 0..0 are done; pass --epochs above 1"),
        (["--epochs", "2", "--ema-decay", "0.9"], "did not use EMA"),
        (["--epochs", "2", "--lr", "0.1"], "that run used --lr 0.05; resume it with the same --lr"),
        (["--epochs", "2", "--seed", "1"], "that run used --seed 0; resume it with the same --seed"),
        (["--epochs", "2", "--clip-mode", "agc"], "that run did not clip its gradients; resume it with --clip-mode "
                                                  "none"),
    ]:
        code, _, err = run_cli(_tiny_run_args(eight_images, out, *extra, "--resume", str(out)))
        assert code == 2 and message in err and len(err.splitlines()) == 1, err
    args = _tiny_run_args(eight_images, out, "--epochs", "2", "--resume", str(out))
    args[args.index("resnet_mini_gn_ws")] = "resnet_mini_gn"
    code, _, err = run_cli(args)
    assert code == 2 and "that run trained resnet_mini_gn_ws" in err and "pass --model resnet_mini_gn_ws" in err
    (out / "train_state.safetensors").write_bytes((out / "train_state.safetensors").read_bytes()[:100])
    before = tree_snapshot(out)
    code, _, err = run_cli(_tiny_run_args(eight_images, out, "--epochs", "2", "--resume", str(out)))
    assert code == 2 and "train_state.safetensors" in err and "not a readable safetensors file" in err, err
    assert tree_snapshot(out) == before


def test_a_clipped_run_resumes_only_with_its_clipping(eight_images, tmp_path):
    """A run with AGC resumed without --clip-mode (or with another factor) is refused, naming both flags: it
    would otherwise go on unclipped (a newcomer's report)."""
    from tests.helpers import run_cli, tree_snapshot

    out = tmp_path / "agc"
    assert run_cli(_tiny_run_args(eight_images, out, "--epochs", "1", "--clip-mode", "agc", "--clip-grad",
                                  "0.02"))[0] == 0
    before = tree_snapshot(out)
    for extra in ([], ["--clip-mode", "agc"], ["--clip-mode", "norm", "--clip-grad", "0.02"]):
        code, _, err = run_cli(_tiny_run_args(eight_images, out, "--epochs", "2", *extra, "--resume", str(out)))
        assert code == 2 and len(err.splitlines()) == 1, err
        assert "that run clipped its gradients with --clip-mode agc and --clip-grad 0.02" in err, err
    assert tree_snapshot(out) == before
    assert run_cli(_tiny_run_args(eight_images, out, "--epochs", "2", "--clip-mode", "agc", "--clip-grad", "0.02",
                                  "--resume", str(out)))[0] == 0


def test_a_diverging_run_stops_and_keeps_its_last_good_epoch(eight_images, tmp_path):
    from tests.helpers import run_cli

    """At lr 1e30 the first step blows the weights up (finite), the second epoch's loss is not finite."""
    out = tmp_path / "run"
    code, _, err = run_cli(_tiny_run_args(eight_images, out, "--epochs", "3", "--lr", "1e30", "--warmup-epochs", "0"))
    assert code == 1 and "training diverged" in err and len(err.splitlines()) == 1, err
    assert "at epoch 1" in err and json.loads((out / "train_state.json").read_text())["epoch"] == 0
    assert [json.loads(r)["epoch"] for r in (out / "metrics.jsonl").read_text().splitlines()] == [0]


def test_ctrl_c_is_one_line_and_the_run_resumes_cleanly(tmp_path):
    """A real `python -m wszoo finetune` stopped with SIGINT in its second epoch."""
    from tests.helpers import interrupt_second_epoch

    data = make_fashion_mnist(tmp_path / "fm", n_train=1500, n_test=8)
    out = tmp_path / "run"
    returncode, err = interrupt_second_epoch(_tiny_run_args(data, out, "--epochs", "3"), out, REPO)
    errors = [line for line in err.splitlines() if line.startswith("wszoo")]
    assert returncode == 130, err
    assert "Traceback" not in err and errors == [
        f"wszoo finetune: interrupted during epoch 1; {out} holds epochs 0..0: resume with the same command and "
        f"--resume {out}"]
    assert json.loads((out / "train_state.json").read_text())["epoch"] == 0
    assert not any(p.name.startswith(".") for p in out.iterdir()), "no half-written epoch may be left"
    from tests.helpers import run_cli

    assert run_cli(_tiny_run_args(data, out, "--epochs", "2", "--resume", str(out), "--limit-train", "64"))[0] == 0
    assert [json.loads(r)["epoch"] for r in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1]
