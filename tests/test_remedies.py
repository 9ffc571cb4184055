"""Errors that send the user the right way (issue 24, part 4), run as commands: the remedy is the flag of the
command that ran (not a Python argument), a place to put a file, a command that works as written; an
unreachable download host fails at once instead of after huggingface_hub's ~23 s of retries."""
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

import wszoo
from tests.data_fixtures import make_coco_shapes, make_fashion_mnist
from tests.helpers import randomize_, run_cli
from tests.hub_fixtures import make_hf_cache
from wszoo.detection import build_detector
from wszoo.errors import Fix, UsageError
from wszoo.hub import PretrainedWeightsError, load_pretrained

BIT = "resnetv2_50x1_bit"
BIT_REPO = f"{BIT}.goog_distilled_in1k"


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """Empty Hugging Face and wszoo caches; the forked commands see this environment."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("WSZOO_CACHE", str(tmp_path / "wszoo-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    return tmp_path


def closed_port() -> int:
    """A local port nothing listens on (connections to it are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_line_error(argv, code=2):
    rc, _, err = run_cli(argv)
    assert rc == code, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


# --- the GN+WS authors' pickles, offline ---------------------------------------------------------------------
def test_offline_pickle_says_where_to_put_it_and_its_convert_command_works(caches, monkeypatch, tmp_path):
    """docs/training.md's `wszoo finetune --model resnet50_gn_ws --pretrained ...` offline: the URL, the convert command
    into the cache (run here as printed), and --checkpoint DIR (not checkpoint_path) for a copy elsewhere."""
    fm = make_fashion_mnist(tmp_path / "fm", n_train=8, n_test=4)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = ["finetune", "--model", "resnet50_gn_ws", "--pretrained", "--dataset", "fashion-mnist", "--data-dir",
            str(fm), "--num-classes", "10", "--output", str(tmp_path / "run")]
    err = one_line_error(argv)
    url = wszoo.get_pretrained_cfg("resnet50_gn_ws.jhu_in1k")["url"]
    target = caches / "wszoo-cache" / "resnet50_gn_ws.jhu_in1k"
    assert url in err and "HF_HUB_OFFLINE is set" in err
    assert "pass --checkpoint DIR" in err and "checkpoint_path" not in err
    command = re.search(r"`(wszoo convert [^`]+)`", err).group(1)
    assert command == f"wszoo convert resnet50_gn_ws-15beedd8.pth --source pth --model resnet50_gn_ws.jhu_in1k " \
                      f"-o {target}"
    # do what it says: the downloaded file (here: random weights in mmdetection's layout), converted as printed
    src = randomize_(wszoo.create_model("resnet50_gn_ws"), seed=2).eval()
    torch.save({"state_dict": src.state_dict()}, tmp_path / "resnet50_gn_ws-15beedd8.pth")
    rc, _, convert_err = run_cli(shlex.split(command)[1:], cwd=tmp_path)
    assert rc == 0, convert_err
    loaded = wszoo.create_model("resnet50_gn_ws", pretrained=True).eval()  # offline: from the cache
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), src(x))


def test_unreachable_pickle_host_fails_at_once_and_names_the_python_argument(caches):
    cfg = {**wszoo.get_pretrained_cfg("resnet50_gn_ws.jhu_in1k"),
           "url": f"http://127.0.0.1:{closed_port()}/resnet50_gn_ws-15beedd8.pth"}
    start = time.perf_counter()
    with pytest.raises(PretrainedWeightsError) as info:
        load_pretrained(wszoo.create_model("resnet_mini_gn_ws"), cfg)
    assert time.perf_counter() - start < 5
    msg = str(info.value)
    assert "failed: Connection refused" in msg and cfg["url"] in msg
    assert "pass checkpoint_path='<DIR>/model.safetensors'" in msg and "--checkpoint" not in msg


# --- the Hub, unreachable ------------------------------------------------------------------------------------
@pytest.mark.parametrize("endpoint, reason", [
    ("http://127.0.0.1:{port}", "connecting to 127.0.0.1:{port} failed: Connection refused"),
    ("http://wszoo-test.invalid", "wszoo-test.invalid cannot be resolved"),
])
def test_unreachable_hub_fails_in_seconds_with_the_flag(caches, monkeypatch, tmp_path, endpoint, reason):
    port = closed_port()
    monkeypatch.setenv("HF_ENDPOINT", endpoint.format(port=port))
    start = time.perf_counter()
    err = one_line_error(["eval", "--model", BIT, "--pretrained", "--data-dir", str(tmp_path)])
    seconds = time.perf_counter() - start
    assert seconds < 10, f"{seconds:.1f} s: huggingface_hub's retries (1+2+4+8+8 s) were not skipped"
    assert f"the Hub cannot be reached ({reason.format(port=port)}" in err
    assert f"`hf download timm/{BIT_REPO} model.safetensors`" in err and str(caches / "hf-cache") in err
    assert err.rstrip().endswith("or pass --checkpoint FILE.") and "checkpoint_path" not in err


def test_unreachable_hub_still_serves_the_cache(caches, monkeypatch):
    model = randomize_(wszoo.create_model(BIT), seed=1)
    data = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(data, str(caches / "w.safetensors"))
    make_hf_cache(caches / "hf-cache", f"timm/{BIT_REPO}", {"model.safetensors": (caches / "w.safetensors")
                                                             .read_bytes()}, "0" * 40)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    start = time.perf_counter()
    loaded = wszoo.create_model(BIT, pretrained=True)
    assert time.perf_counter() - start < 10
    assert all(torch.equal(v, data[k]) for k, v in loaded.state_dict().items())


# --- the Python name in the library, the flag on the command line ---------------------------------------------
def test_fix_is_spelled_for_python_and_left_out_where_no_flag_exists():
    error = UsageError("no weights{pretrained_backbone}{check_architecture}",
                       Fix("pretrained_backbone", "False", phrase="; pass {}", call="build_detector"),
                       Fix("check_architecture", "False", phrase=" (or {})"))
    assert str(error) == "no weights; pass build_detector(..., pretrained_backbone=False) (or check_architecture=False)"
    flags = {"pretrained_backbone": "--no-pretrained-backbone"}
    assert error.render(lambda fix: flags.get(fix.param)) == "no weights; pass --no-pretrained-backbone"
    assert isinstance(error, ValueError)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_coco_shapes(tmp_path_factory.mktemp("coco") / "train", n_images=2, seed=0)


def test_detect_train_names_its_flags(shapes, caches, monkeypatch, tmp_path):
    images, annotations = shapes
    base = ["detect", "train", "--train-images", str(images), "--train-annotations", str(annotations),
            "--output", str(tmp_path / "run"), "--min-size", "64", "--max-size", "64"]
    err = one_line_error(base + ["--backbone", "nf_regnet_b0", "--pretrained-backbone"])
    assert "nf_regnet_b0 has no published weights" in err and "pass --no-pretrained-backbone" in err
    assert "pretrained_backbone=False" not in err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the recipe's default start, offline: how to fetch, or start random
    err = one_line_error(base + ["--backbone", "resnetv2_50x1_bit"])
    assert "hf download timm/resnetv2_50x1_bit" in err and "pass --no-pretrained-backbone." in err
    assert "checkpoint" not in err  # neither create_model's checkpoint_path nor a --checkpoint detect train lacks
    with pytest.raises(PretrainedWeightsError, match=r"pass build_detector\(\.\.\., pretrained_backbone=False\)"):
        build_detector("fasterrcnn", "resnetv2_50x1_bit", 3)


def test_detect_eval_logs_the_trained_weights_not_a_random_start(shapes, tmp_path):
    from wszoo.detection import save_detector

    images, annotations = shapes
    args = {"kind": "fasterrcnn", "backbone": "nf_regnet_b0", "num_classes": 3,
            "detector_kwargs": {"min_size": 64, "max_size": 64}, "categories": {"1": "square", "7": "plus"}}
    model = build_detector("fasterrcnn", "nf_regnet_b0", 3, pretrained_backbone=False, min_size=64, max_size=64)
    save_detector(model, tmp_path / "det", args)
    # a real interpreter: the forked run_cli inherits pytest's log capture, and this is about the log
    proc = subprocess.run([sys.executable, "-m", "wszoo", "detect", "eval", "--checkpoint", str(tmp_path / "det"),
                           "--images", str(images), "--annotations", str(annotations)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    out, err = proc.stdout, proc.stderr
    assert proc.returncode == 0, err
    assert "random backbone weights" not in err and "nothing frozen" not in err
    assert f"fasterrcnn on nf_regnet_b0: trained weights from {tmp_path / 'det' / 'model.safetensors'}" in err
    assert out.startswith("bbox: AP ")


# --- convert on a file that is not a checkpoint ---------------------------------------------------------------
class TrainingConfig:
    """An object pickled beside the weights: what weights-only loading refuses to build."""


def test_convert_of_a_random_file_is_one_line_without_unsafe_advice(tmp_path):
    (tmp_path / "random.pth").write_bytes(os.urandom(4096))
    err = one_line_error(["convert", str(tmp_path / "random.pth"), "--source", "pth", "--model", "resnet_mini_gn_ws",
                          "-o", str(tmp_path / "out")])
    assert "is not a PyTorch checkpoint (neither torch.save's zip archive nor a pickle)" in err
    assert "`wszoo convert --source pth` reads torch.save files" in err
    assert "weights_only` set to `False`" not in err and "weights_only=False" not in err and len(err) < 400

    torch.save({"config": TrainingConfig(), "state_dict": {}}, tmp_path / "object.pth")
    err = one_line_error(["convert", str(tmp_path / "object.pth"), "--source", "pth", "--model", "resnet_mini_gn_ws",
                          "-o", str(tmp_path / "out")])
    assert "asks to build tests.test_remedies.TrainingConfig, which weights-only loading refuses" in err
    assert "weights_only` set to `False`" not in err and "add_safe_globals" not in err


# --- docs/training.md's resume command, as written ------------------------------------------------------------
def test_resume_alone_continues_the_run_in_place(tmp_path):
    fm = make_fashion_mnist(tmp_path / "fm", n_train=16, n_test=8)
    base = ["finetune", "--model", "resnet_mini_gn_ws", "--dataset", "fashion-mnist", "--data-dir", str(fm),
            "-b", "8", "--log-interval", "0"]
    run = tmp_path / "runs" / "fm"
    assert run_cli(base + ["--epochs", "1", "--output", str(run)])[0] == 0
    rc, _, err = run_cli(base + ["--epochs", "2", "--resume", str(run)])  # docs/training.md: ... --resume DIR
    assert rc == 0, err
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["epoch"] for r in rows] == [0, 1]
    err = one_line_error(base + ["--epochs", "1"])
    assert "--output DIR is required" in err and "--resume DIR" in err
