"""wszoo eval: against a hand-written reference loop, sharded under torchrun, and its errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import create_transform

import wszoo
from tests.data_fixtures import make_image_folder
from tests.helpers import child_log
from wszoo.cli import main
from wszoo.training.data import data_config_for

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    root = make_image_folder(tmp / "data", per_class=4, splits=("val",))
    # 11 images: uneven shards for 2 ranks
    os.remove(root / "val" / "c" / "3.png")
    torch.manual_seed(0)
    model = wszoo.create_model("resnet_mini_gn_ws", num_classes=3, in_chans=3)
    with torch.no_grad():
        model.head.fc.weight.normal_(0, 1.0)  # confident, varied predictions
    wszoo.save_pretrained(model, str(tmp / "ckpt"))
    return root, tmp / "ckpt", model.eval()


def reference(model, root):
    cfg = data_config_for(model)
    tf = create_transform(**cfg)
    correct = loss = n = 0
    classes = sorted(p.name for p in (root / "val").iterdir())
    for label, cls in enumerate(classes):
        for path in sorted((root / "val" / cls).iterdir()):
            x = tf(Image.open(path).convert("RGB"))[None]
            with torch.no_grad():
                logits = model(x)
            correct += int(logits.argmax(1).item() == label)
            loss += F.cross_entropy(logits, torch.tensor([label])).item()
            n += 1
    return 100.0 * correct / n, loss / n, n


def run_eval(args, tmp_path):
    out = tmp_path / "r.json"
    assert main(["eval", *args, "--results-file", str(out)]) == 0
    return json.loads(out.read_text())


def test_eval_equals_reference_loop(setup, tmp_path):
    root, ckpt, model = setup
    result = run_eval(["--model", "resnet_mini_gn_ws", "--checkpoint", str(ckpt), "--num-classes", "3",
                       "--in-chans", "3", "--data-dir", str(root), "-b", "4"], tmp_path)
    top1, loss, n = reference(model, root)
    assert result["num_samples"] == n == 11
    assert result["top1"] == pytest.approx(top1) and result["loss"] == pytest.approx(loss, rel=1e-5)
    assert 0 < result["top1"] < 100  # the reference is not trivially all-right or all-wrong
    assert set(result) >= {"top1", "top5", "loss", "num_samples", "img_per_sec", "param_count", "img_size", "crop_pct"}
    assert result["top5"] == 100.0  # 3 classes


def test_eval_csv(setup, tmp_path):
    root, ckpt, _ = setup
    out = tmp_path / "r.csv"
    assert main(["eval", "--model", "resnet_mini_gn_ws", "--checkpoint", str(ckpt), "--num-classes", "3",
                 "--in-chans", "3", "--data-dir", str(root), "--results-file", str(out),
                 "--results-format", "csv"]) == 0
    header, row = out.read_text().splitlines()
    assert header.startswith("top1,top5,loss,num_samples") and row.count(",") == header.count(",")


def test_torchrun_two_processes_equal_one(setup, tmp_path):
    root, ckpt, _ = setup
    args = ["eval", "--model", "resnet_mini_gn_ws", "--checkpoint", str(ckpt), "--num-classes", "3", "--in-chans",
            "3", "--data-dir", str(root), "-b", "2"]
    single = run_eval(args[1:], tmp_path)
    out = tmp_path / "r2.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "wszoo", *args, "--results-file", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert proc.returncode == 0, child_log(proc)
    double = json.loads(out.read_text())
    assert double["world_size"] == 2 and double["num_samples"] == single["num_samples"] == 11
    assert double["top1"] == single["top1"] and double["top5"] == single["top5"]
    # per-image losses are float32 and batched differently (2 per rank vs 2 per batch): rounding only
    assert double["loss"] == pytest.approx(single["loss"], rel=1e-6)


def test_the_command_leaves_its_process_group(setup, tmp_path):
    """A gloo rank that exits with its process group alive can abort at exit (SIGABRT, 'terminate called without
    an active exception'), the likelier the longer another rank keeps working after the last collective: rank 0
    writing the results on a loaded machine (the cause of a failure of the torchrun test above). Every command
    leaves the group as it ends."""
    import torch.distributed as dist

    root, ckpt, _ = setup
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        run_eval(["--model", "resnet_mini_gn_ws", "--checkpoint", str(ckpt), "--num-classes", "3", "--in-chans", "3",
                  "--data-dir", str(root)], tmp_path)
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.parametrize("args, message", [
    (["--model", "resnet_mini_gn_ws", "--data-dir", "/nonexistent/dir"], "does not exist"),
    (["--model", "resnet_mini_gnws", "--data-dir", "."], "Unknown model 'resnet_mini_gnws'"),
    (["--model", "resnet_mini_gn_ws", "--in-chans", "3"], "has 3 classes but resnet_mini_gn_ws has 10 outputs"),
    (["--model", "resnet_mini_gn_ws", "--data-dir", "EMPTY"], "empty"),
])
def test_eval_bad_input_is_one_line(setup, tmp_path, capsys, args, message):
    root, _, _ = setup
    (tmp_path / "empty" / "val" / "x").mkdir(parents=True)
    args = [a.replace("EMPTY", str(tmp_path / "empty")) for a in args]
    if "--data-dir" not in args:
        args += ["--data-dir", str(root)]
    assert main(["eval", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
