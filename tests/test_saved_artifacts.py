"""What a saved model says about itself (issue 24, parts 1 and 2): a card and config.json that claim a
published tag and its accuracy only for that tag's unchanged weights, folders that timm's own
create_model reads (local-dir: and hf-hub:), and a timm folder or a checkpoint folder read right."""
import json
import subprocess
import sys
import textwrap

import pytest
import timm
import torch

import wszoo
from tests.data_fixtures import make_image_folder
from tests.helpers import randomize_, run_cli
from tests.hub_fixtures import FakeHub
from wszoo.checkpoint import CheckpointError

COMMIT = "0123456789abcdef0123456789abcdef01234567"
TAG = "resnet_mini_gn_ws.fmnist"


def saved(model, path, **kwargs):
    wszoo.save_pretrained(model, str(path), **kwargs)
    return json.loads((path / "config.json").read_text()), (path / "README.md").read_text()


# --- part 1: the card and config say what the weights are -------------------------------------------------
def test_published_tag_is_claimed_only_while_the_weights_are_unchanged(tmp_path):
    published = wszoo.create_model(TAG, pretrained=True)
    config, card = saved(published, tmp_path / "tag")
    top1 = wszoo.get_pretrained_cfg(TAG)["top1"]
    assert card.splitlines()[card.splitlines().index("---", 1) + 2] == f"# {TAG}"
    assert f"Published top-1: {top1}% on Fashion-MNIST test set (10,000 images)" in card
    assert "create_model('hf-hub:<this repo>', pretrained=True)" in card
    assert config["pretrained_cfg"]["tag"] == "fmnist" and config["wszoo"]["weights"]["kind"] == "published"

    again = wszoo.create_model(f"local-dir:{tmp_path / 'tag'}", pretrained=True)  # read back: still the tag
    assert saved(again, tmp_path / "again")[1] == card

    with torch.no_grad():
        again.head.fc.bias.add_(0.5)  # any change to the tensors
    config, card = saved(again, tmp_path / "changed")
    assert f"# {TAG}" not in card and str(top1) not in card and "tag" not in config["pretrained_cfg"]
    assert f"changed after loading the published weights `{TAG}`" in card
    assert "No accuracy is claimed" in card


def test_random_and_adapted_weights_claim_nothing(tmp_path):
    config, card = saved(wszoo.create_model("resnet_mini_gn_ws"), tmp_path / "random")
    assert "# resnet_mini_gn_ws (random initialization, not trained)" in card
    assert "fmnist" not in card and "top1" not in json.dumps(config) and "tag" not in config["pretrained_cfg"]

    three = wszoo.create_model(TAG, pretrained=True, num_classes=3)  # a fresh head: not the checkpoint any more
    config, card = saved(three, tmp_path / "three")
    assert "a new 3-class classifier (random initialization, not trained)" in card and "Published" not in card
    assert config["pretrained_cfg"]["num_classes"] == 3 == config["num_classes"]


def test_finetune_card_names_its_start_data_and_measured_accuracy_and_export_reads_it(tmp_path):
    data = make_image_folder(tmp_path / "pets", classes=("cat", "dog", "owl"), per_class=4, size=28,
                             splits=("train", "val"))
    run = tmp_path / "ft"
    code, stdout, err = run_cli(["finetune", "--model", TAG, "--pretrained", "--num-classes", "3", "--data-dir",
                                 str(data), "--epochs", "1", "-b", "4", "--log-interval", "0", "--output", str(run)])
    assert code == 0, err
    measured = json.loads(stdout.strip().splitlines()[-1])["val_top1"]
    config = json.loads((run / "best" / "config.json").read_text())
    card = (run / "best" / "README.md").read_text()
    assert "# resnet_mini_gn_ws, fine-tuned on ImageFolder 'pets' (12 training images)" in card
    assert f"fine-tuned from the published weights `{TAG}`" in card and "Published" not in card
    assert f"Top-1: {measured:.2f}% on ImageFolder 'pets' val split (12 images), measured by the training run" in card
    assert "93.12" not in card and "ImageNet" not in card
    cfg = config["pretrained_cfg"]
    assert (cfg["num_classes"], cfg["label_names"], config["label_names"]) == (3, ["cat", "dog", "owl"],
                                                                                ["cat", "dog", "owl"])
    assert "tag" not in cfg and cfg["input_size"] == [1, 28, 28]

    # the folder as --checkpoint brings its 3 classes and 1 input channel (the failing export)
    code, stdout, err = run_cli(["export", "resnet_mini_gn_ws", "--checkpoint", str(run / "best"),
                                 "-o", str(tmp_path / "m.onnx")])
    assert code == 0, err
    code, stdout, err = run_cli(["eval", "--model", "resnet_mini_gn_ws", "--checkpoint", str(run / "best"),
                                 "--data-dir", str(data), "--split", "val"])
    assert code == 0, err
    assert f"top1 {measured:.2f}%" in stdout  # the card's number is the one eval measures on those weights


def test_convert_records_the_file_not_the_default_tag(tmp_path):
    src = randomize_(wszoo.create_model("resnet_mini_gn_ws"), seed=2)
    torch.save({"state_dict": src.state_dict()}, tmp_path / "mine.pth")
    code, _, err = run_cli(["convert", str(tmp_path / "mine.pth"), "--source", "pth", "--model", "resnet_mini_gn_ws",
                            "-o", str(tmp_path / "out")])
    assert code == 0, err
    card = (tmp_path / "out" / "README.md").read_text()
    assert "# resnet_mini_gn_ws, converted from mine.pth" in card
    assert "converted by `wszoo convert` from `mine.pth`" in card and "93.12" not in card and "fmnist" not in card
    loaded = wszoo.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True)
    assert loaded.weights_provenance["weights"] == {"kind": "converted", "file": "mine.pth"}


def test_checkpoint_folder_from_another_architecture_is_named(tmp_path):
    wszoo.save_pretrained(wszoo.create_model("resnet_mini_gn", num_classes=3), str(tmp_path / "gn"))
    with pytest.raises(CheckpointError, match="was saved from resnet_mini_gn, not resnet_mini_gn_ws"):
        wszoo.create_model("resnet_mini_gn_ws", checkpoint_path=str(tmp_path / "gn"))


# --- part 2: timm reads our folders, and we read timm's --------------------------------------------------------
TIMM_SCRIPT = textwrap.dedent("""
    import json, sys, timm, torch
    for case in json.loads(sys.argv[1]):
        model = timm.create_model(case["name"], pretrained=True).eval()
        with torch.no_grad():
            torch.save(model(torch.load(case["input"])), case["output"])
""")


def test_timm_create_model_reads_our_folders_bitwise(tmp_path):
    """BiT, an NF model and a ViT hybrid, through local-dir: and a Hub server (timm in a fresh process, which
    reads HF_ENDPOINT when huggingface_hub is imported)."""
    cases, expected = [], {}
    with FakeHub() as hub:
        for arch, size in (("resnetv2_50x1_bit", 32), ("nf_regnet_b0", 32), ("vit_tiny_r_s16_p8_224", 224)):
            model = randomize_(wszoo.create_model(arch, num_classes=5), seed=7).eval()
            folder = tmp_path / arch
            wszoo.save_pretrained(model, str(folder))
            hub.add(f"me/{arch}", {p.name: p.read_bytes() for p in folder.iterdir()}, COMMIT)
            x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3))
            torch.save(x, tmp_path / f"{arch}.x")
            with torch.no_grad():
                expected[arch] = model(x)
            for name in (f"local-dir:{folder}", f"hf-hub:me/{arch}"):
                cases.append({"name": name, "input": str(tmp_path / f"{arch}.x"),
                              "output": str(tmp_path / f"{len(cases)}.out"), "arch": arch})
        env = {"HF_ENDPOINT": hub.endpoint, "HF_HUB_CACHE": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1",
               "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": str(torch.get_num_threads())}  # (as here: bitwise)
        done = subprocess.run([sys.executable, "-c", TIMM_SCRIPT, json.dumps(cases)], env=env, capture_output=True,
                              text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for case in cases:
        assert torch.equal(torch.load(case["output"]), expected[case["arch"]]), case["name"]
    assert sum(1 for _, path in hub.requests if path.endswith("/model.safetensors")) >= 3


def test_config_keeps_timms_layout(tmp_path):
    config, _ = saved(wszoo.create_model("nf_regnet_b0", num_classes=5, ws_style="deepmind", std_conv_eps=1e-4),
                      tmp_path / "nf")
    fields = set(timm.models.PretrainedCfg.__dataclass_fields__)
    assert set(config["pretrained_cfg"]) <= fields
    assert set(config) <= {"architecture", "num_classes", "num_features", "global_pool", "label_names",
                           "label_descriptions", "model_args", "pretrained_cfg", "wszoo"}
    assert config["model_args"] == {"num_classes": 5, "in_chans": 3, "global_pool": "avg"}
    assert config["wszoo"]["model_args"] == {"ws_style": "deepmind", "std_conv_eps": 1e-4}
    rebuilt = wszoo.create_model(f"local-dir:{tmp_path / 'nf'}", pretrained=True)
    assert rebuilt.model_args["ws_style"] == "deepmind"


def test_a_timm_pickle_folder_names_the_pickle_and_the_command_that_converts_it(tmp_path):
    from timm.models import save_for_hf

    theirs = randomize_(timm.create_model("nf_regnet_b0", num_classes=3), seed=5).eval()
    save_for_hf(theirs, str(tmp_path / "timm"))  # timm's default: pytorch_model.bin
    code, _, err = run_cli(["eval", "--model", f"local-dir:{tmp_path / 'timm'}", "--dataset", "fashion-mnist"])
    assert code == 2
    assert "holds pytorch_model.bin (a PyTorch pickle" in err and "does not exist" not in err
    command = err.split("`")[1]
    assert command.startswith("wszoo convert ")
    code, _, err = run_cli(command.split()[1:])  # the command, as printed
    assert code == 0, err
    ours = wszoo.create_model(f"local-dir:{tmp_path / 'timm'}-safetensors", pretrained=True).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))


def test_a_run_from_random_weights_is_carded_as_trained_not_as_untrained(tmp_path):
    """Without --pretrained the card says the weights were trained from random initialization on the data,
    not "fine-tuned from random initialization, not trained on ..." (a newcomer's report)."""
    data = make_image_folder(tmp_path / "pets", classes=("cat", "dog"), per_class=4, size=28, splits=("train", "val"))
    run = tmp_path / "scratch"
    code, _, err = run_cli(["finetune", "--model", "resnet_mini_gn_ws", "--num-classes", "2", "--data-dir", str(data),
                            "--epochs", "1", "-b", "4", "--log-interval", "0", "--output", str(run)])
    assert code == 0, err
    card = (run / "last" / "README.md").read_text()
    assert "# resnet_mini_gn_ws, trained on ImageFolder 'pets' (8 training images)" in card
    assert "trained from random initialization on ImageFolder 'pets' (8 training images) (1 epoch)." in card
    assert "not trained" not in card and "fine-tuned" not in card
