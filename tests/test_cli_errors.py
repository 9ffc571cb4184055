"""The mistakes users make, run as commands: each is one line on stderr naming the problem (and the fix),
a non-zero exit, and no file changed or left half-written. Ctrl-C and torchrun cases are in test_train.py."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import wszoo
from tests.data_fixtures import make_fashion_mnist, make_image_folder
from tests.helpers import run_cli, tree_snapshot


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    fm = make_fashion_mnist(root / "fm", n_train=16, n_test=8)
    tree = make_image_folder(root / "tree", per_class=2, size=16, splits=("train", "val"))
    saved = root / "saved_gn"
    wszoo.save_pretrained(wszoo.create_model("resnet_mini_gn", num_classes=3, in_chans=3), str(saved))
    return {"fm": fm, "tree": tree, "saved_gn": saved, "root": root}


def expect_one_line_error(argv, message, workdir, code=2):
    """Run the command; it must fail with ``code`` and exactly one stderr line containing ``message``, and
    leave ``workdir`` exactly as it was."""
    before = tree_snapshot(workdir)
    rc, _, err = run_cli(argv)
    assert rc == code, err
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert "Traceback" not in err
    assert tree_snapshot(workdir) == before, "the failed command changed files"
    return err


# --- 8, 10: values out of range, wrong choices --------------------------------------------------------------
FINETUNE = ["finetune", "--model", "resnet_mini_gn_ws", "--dataset", "fashion-mnist", "--output", "OUT"]


@pytest.mark.parametrize("flag, value, message", [
    ("--limit-train", "-5", "--limit-train must be >= 1, got -5"),
    ("--clip-grad", "-1", "--clip-grad must be > 0, got -1"),
    ("--img-size", "0", "--img-size must be >= 1, got 0"),
    ("--epochs", "0", "--epochs must be >= 1, got 0"),
    ("--epochs", "-1", "--epochs must be >= 1, got -1"),
    ("--accum-steps", "-1", "--accum-steps must be >= 1, got -1"),
    ("--accum-steps", "0", "--accum-steps must be >= 1, got 0"),
    ("--ema-decay", "2", "--ema-decay must be in [0, 1), got 2"),
    ("--lr", "0", "--lr must be > 0, got 0"),
    ("--lr", "nan", "--lr must be > 0, got nan"),
    ("--momentum", "1.5", "--momentum must be in [0, 1), got 1.5"),
    ("--drop-path", "1", "--drop-path must be in [0, 1), got 1"),
    ("-b", "0", "--batch-size must be >= 1, got 0"),
    ("--freeze-stages", "-2", "--freeze-stages must be >= -1, got -2"),
    ("--in-chans", "2", "argument --in-chans: invalid choice: 2 (choose from 1, 3)"),
])
def test_finetune_values_out_of_range(flag, value, message, data, tmp_path):
    argv = [a.replace("OUT", str(tmp_path / "run")) for a in FINETUNE] + ["--data-dir", str(data["fm"]), flag, value]
    expect_one_line_error(argv, message, tmp_path)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("extra, message", [
    (["--clip-mode", "norm"], "--clip-mode norm needs --clip-grad MAX_NORM: the largest global gradient norm"),
    (["--clip-grad", "0.5"], "--clip-grad sets the clip of --clip-mode agc or norm; pass one of them too"),
])
def test_finetune_clip_grad_means_what_its_mode_says(extra, message, data, tmp_path):
    """AGC's 0.01 is no default for a maximum norm, and a factor without a clip mode would be ignored."""
    argv = [a.replace("OUT", str(tmp_path / "run")) for a in FINETUNE] + ["--data-dir", str(data["fm"]), *extra]
    expect_one_line_error(argv, message, tmp_path)
    assert not (tmp_path / "run").exists()


def test_finetune_without_data_says_which_flag(tmp_path):
    argv = ["finetune", "--model", "resnet_mini_gn_ws", "--output", str(tmp_path / "run")]
    expect_one_line_error(argv, "no data to train on: pass --data-dir DIR", tmp_path)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, message", [
    (["--crop-pct", "0"], "--crop-pct must be in (0, 1], got 0"),
    (["--interpolation", "foo"], "argument --interpolation: invalid choice: 'foo'"),
    (["--in-chans", "2"], "argument --in-chans: invalid choice: 2"),
    (["--mean", "0.5", "0.5"], "--mean takes 1 or 1 values"),
    (["--std", "0"], "--std values must be > 0"),
    (["--split", "vall"], "has no split 'vall'; the splits present are: train, val"),
])
def test_eval_bad_values(args, message, data, tmp_path):
    base = ["eval", "--model", "resnet_mini_gn_ws.fmnist", "--pretrained", "--data-dir", str(data["tree"]),
            "--in-chans", "1", "--num-classes", "3"]
    if "--in-chans" in args:
        base = base[:-4] + base[-2:]
    expect_one_line_error(base + args, message, tmp_path)


def test_create_model_refuses_nonsense_arguments():
    for kwargs, message in [({"num_classes": -5}, "num_classes must be an integer >= 0, got -5"),
                            ({"num_classes": 2.7}, "num_classes must be an integer >= 0, got 2.7"),
                            ({"in_chans": 0}, "in_chans must be an integer >= 1, got 0"),
                            ({"drop_rate": 1.5}, "drop_rate must be a probability in [0, 1), got 1.5"),
                            ({"frozen_stages": -3}, "frozen_stages must be an integer >= -1, got -3")]:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")
                           .replace("[", r"\[")):
            wszoo.create_model("resnet_mini_gn_ws", **kwargs)


def test_bench_on_a_missing_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    expect_one_line_error(["bench", "resnet_mini_gn_ws", "--device", "cuda"], "no CUDA device is available", tmp_path)
    expect_one_line_error(["bench", "resnet_mini_gn_ws", "--device", "tpu9"], "is not a device torch knows", tmp_path)


# --- 5: outputs are checked before the work, results are always printed ------------------------------------
def test_results_file_in_a_missing_directory_fails_before_the_evaluation(data, tmp_path):
    err = expect_one_line_error(["eval", "--model", "resnet_mini_gn_ws.fmnist", "--pretrained", "--dataset",
                                 "fashion-mnist", "--data-dir", str(data["fm"]), "--split", "test",
                                 "--results-file", str(tmp_path / "no" / "r.json")], "does not exist", tmp_path)
    assert "--results-file" in err


def test_results_are_printed_and_written_as_valid_json(data, tmp_path, monkeypatch):
    """A NaN loss (fp16 overflow can give one) becomes null, so the file stays valid JSON."""
    import wszoo.training.evaluate

    real = wszoo.training.evaluate.evaluate

    def nan_loss(*args, **kwargs):
        return {**real(*args, **kwargs), "loss": float("nan")}

    monkeypatch.setattr(wszoo.training.evaluate, "evaluate", nan_loss)  # the forked command sees the patch
    out = tmp_path / "r.json"
    rc, stdout, err = run_cli(["eval", "--model", "resnet_mini_gn_ws.fmnist", "--pretrained", "--dataset",
                               "fashion-mnist", "--data-dir", str(data["fm"]), "--split", "test", "--results-file",
                               str(out)])
    assert rc == 0, err
    assert "resnet_mini_gn_ws.fmnist: top1" in stdout and "loss nan" in stdout
    result = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the results file"))
    assert result["loss"] is None and result["weights"] == "pretrained" and result["num_samples"] == 8


def test_eval_says_plainly_when_the_weights_are_random(data, tmp_path):
    rc, stdout, err = run_cli(["eval", "--model", "resnet_mini_gn_ws.fmnist", "--dataset", "fashion-mnist",
                               "--data-dir", str(data["fm"]), "--split", "test"])
    assert rc == 0
    assert "resnet_mini_gn_ws.fmnist has random weights (no --pretrained or --checkpoint)" in err
    assert json.loads(stdout[stdout.index("{"):])["weights"] == "random"


# --- 7: non-finite weights ------------------------------------------------------------------------------------
@pytest.fixture()
def nan_checkpoint(tmp_path):
    model = wszoo.create_model("resnet_mini_gn_ws")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["stages.1.0.conv2.weight"][0, 0, 0, 0] = float("nan")
    state["head.fc.bias"][3] = float("inf")
    path = tmp_path / "nan.safetensors"
    save_file(state, str(path))
    return path


def test_non_finite_weights_are_refused_everywhere(nan_checkpoint, data, tmp_path):
    message = "non-finite values (NaN/Inf) in 2 tensor(s): head.fc.bias, stages.1.0.conv2.weight"
    expect_one_line_error(["eval", "--model", "resnet_mini_gn_ws", "--checkpoint", str(nan_checkpoint), "--dataset",
                           "fashion-mnist", "--data-dir", str(data["fm"]), "--split", "test"], message, tmp_path)
    expect_one_line_error([a.replace("OUT", str(tmp_path / "run")) for a in FINETUNE]
                          + ["--data-dir", str(data["fm"]), "--checkpoint", str(nan_checkpoint)], message, tmp_path)
    pth = tmp_path / "nan.pth"
    from safetensors.torch import load_file

    torch.save({"state_dict": load_file(str(nan_checkpoint))}, pth)
    expect_one_line_error(["convert", str(pth), "--source", "pth", "--model", "resnet_mini_gn_ws", "-o",
                           str(tmp_path / "converted")], message, tmp_path)
    model = wszoo.create_model("resnet_mini_gn_ws")
    with torch.no_grad():
        model.conv1.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="refusing to save resnet_mini_gn_ws: non-finite values .* conv1.weight"):
        wszoo.save_pretrained(model, str(tmp_path / "never"))
    assert not (tmp_path / "never" / "model.safetensors").exists()


# --- 9: weights of another architecture ------------------------------------------------------------------
def test_weights_of_the_plain_twin_are_refused(data, tmp_path):
    """resnet_mini_gn and resnet_mini_gn_ws share every key and shape: only the saved architecture tells."""
    err = expect_one_line_error(["eval", "--model", "resnet_mini_gn_ws", "--checkpoint", str(data["saved_gn"]),
                                 "--num-classes", "3", "--in-chans", "3", "--data-dir", str(data["tree"])],
                                "was saved from resnet_mini_gn, not resnet_mini_gn_ws", tmp_path)
    assert "--model resnet_mini_gn" in err
    with pytest.raises(wszoo.CheckpointError, match="saved from resnet_mini_gn"):
        wszoo.create_model("resnet_mini_gn_ws", num_classes=3, in_chans=3,
                           checkpoint_path=str(data["saved_gn"] / "model.safetensors"))
    model = wszoo.create_model("resnet_mini_gn_ws", num_classes=3, in_chans=3)
    wszoo.load_checkpoint(model, str(data["saved_gn"] / "model.safetensors"), check_architecture=False)  # deliberate


# --- 4: convert and save_pretrained never overwrite what they should not -----------------------------------------
@pytest.fixture()
def pth(tmp_path):
    path = tmp_path / "src.pth"
    torch.save({"state_dict": wszoo.create_model("resnet_mini_gn_ws").state_dict()}, path)
    return path


def test_convert_refuses_an_existing_output_without_force(pth, tmp_path):
    out = tmp_path / "out.safetensors"
    base = ["convert", str(pth), "--source", "pth", "--model", "resnet_mini_gn_ws", "-o"]
    assert run_cli(base + [str(out)])[0] == 0
    expect_one_line_error(base + [str(out)], "already exists; pass --force", tmp_path)
    assert run_cli(base + [str(out), "--force"])[0] == 0
    saved_dir = tmp_path / "saved"
    assert run_cli(base + [str(saved_dir)])[0] == 0
    expect_one_line_error(base + [str(saved_dir)], "already exists; pass --force", tmp_path)
    assert run_cli(base + [str(saved_dir), "--force"])[0] == 0
    unrelated = tmp_path / "photos"
    unrelated.mkdir()
    (unrelated / "holiday.jpg").write_bytes(b"not ours")
    expect_one_line_error(base + [str(unrelated), "--force"], "holding other files, not a saved model", tmp_path)
    expect_one_line_error(base + [str(tmp_path / "nodir" / "x.safetensors")], "does not exist", tmp_path)


def test_save_pretrained_refuses_an_unrelated_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="is not empty and holds no saved model"):
        wszoo.save_pretrained(wszoo.create_model("resnet_mini_gn_ws"), str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_an_interrupted_write_leaves_the_old_files_whole(tmp_path, monkeypatch):
    import wszoo.saved_config

    model = wszoo.create_model("resnet_mini_gn_ws")
    wszoo.save_pretrained(model, str(tmp_path))
    before = tree_snapshot(tmp_path)

    def dies_half_way(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(wszoo.saved_config, "save_file", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        wszoo.save_pretrained(wszoo.create_model("resnet_mini_gn_ws", num_classes=4), str(tmp_path))
    after = tree_snapshot(tmp_path)
    assert after["model.safetensors"] == before["model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary file may be left"


# --- 10: a corrupt image is found before any training --------------------------------------------------------
def test_a_truncated_image_is_named_before_training(data, tmp_path):
    tree = make_image_folder(tmp_path / "tree", per_class=3, size=16, splits=("train", "val"))
    bad = tree / "train" / "b" / "1.png"
    bad.write_bytes(bad.read_bytes()[:60])
    jpeg = tree / "train" / "c" / "2.jpg"
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(jpeg)
    jpeg.write_bytes(jpeg.read_bytes()[:-40])
    argv = ["finetune", "--model", "resnet_mini_gn_ws", "--num-classes", "3", "--in-chans", "3", "--data-dir",
            str(tree), "-j", "2", "--epochs", "1", "--output", str(tmp_path / "run")]
    err = expect_one_line_error(argv, "2 unreadable image file(s)", tmp_path)
    assert str(bad) in err and str(jpeg) in err
    assert not (tmp_path / "run").exists()
