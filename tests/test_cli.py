"""The wszoo command line: list, info, demo, errors, and `python -m wszoo`."""
import json
import subprocess
import sys

import pytest

from wszoo.cli import main


def test_list(capsys):
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.split()
    assert lines[0] == "dm_nfnet_f0" and "resnetv2_152x4_bit" in lines and len(lines) == 59


def test_list_pretrained_filtered(capsys):
    assert main(["list", "*152x4*", "--pretrained"]) == 0
    assert capsys.readouterr().out.split() == ["resnetv2_152x4_bit.goog_in21k", "resnetv2_152x4_bit.goog_in21k_ft_in1k"]


def test_list_no_match(capsys):
    assert main(["list", "swin*"]) == 1
    assert "no model matches 'swin*'" in capsys.readouterr().err


def test_info_json_with_forward(capsys):
    assert main(["info", "resnet50_gn_ws", "--forward", "--img-size", "32", "--num-classes", "7", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["param_count"] == 23_522_375
    assert info["forward"]["output_shape"] == [1, 7]
    assert info["pretrained_cfg"]["input_size"] == [3, 224, 224]


def test_info_forward_of_a_hybrid_at_another_size(capsys):
    assert main(["info", "vit_tiny_r_s16_p8_224", "--forward", "--img-size", "64", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["forward"]["output_shape"] == [1, 1000]


def test_info_unknown_model(capsys):
    assert main(["info", "resnet50_gnws"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("wszoo info: error: Unknown model 'resnet50_gnws'. Did you mean: resnet50_gn_ws")


def test_info_bad_checkpoint(capsys, tmp_path):
    assert main(["info", "resnet50_gn_ws", "--checkpoint", str(tmp_path / "x.pth")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_demo_runs_every_family(capsys):
    assert main(["demo", "--img-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "59 registered models" in out
    assert "resnet_gn_ws: resnet18_gn_ws" in out and "resnetv2_bit: resnetv2_50x1_bit" in out
    assert "nfnet: nf_regnet_b0" in out and "resnet_mini: resnet_mini_bn" in out
    assert "vit_hybrid: vit_tiny_r_s16_p8_224 (6.3M params) input [1, 3, 224, 224]" in out  # its fixed grid


def test_python_dash_m():
    proc = subprocess.run([sys.executable, "-m", "wszoo", "list", "resnext*"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["resnext50_32x4d_gn_ws", "resnext101_32x4d_gn_ws"]


@pytest.mark.parametrize("argv", [[], ["frobnicate"]])
def test_bad_usage_exits_2(argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2


def test_convert_deepmind_nfnet(tmp_path, capsys):
    import numpy as np
    import torch
    from safetensors.torch import load_file

    import wszoo
    from tests.test_convert_weights import to_haiku

    torch.manual_seed(0)
    src = wszoo.create_model("dm_nfnet_f0")
    np.savez(tmp_path / "F0.npz", **to_haiku(src))
    out = tmp_path / "f0.safetensors"
    assert main(["convert", str(tmp_path / "F0.npz"), "--source", "deepmind-nfnet", "--model", "dm_nfnet_f0",
                 "-o", str(out)]) == 0
    assert f"{sum(p.numel() for p in src.parameters()):,} parameters" in capsys.readouterr().out
    saved = load_file(str(out))
    assert all(torch.equal(saved[k], v) for k, v in src.state_dict().items())
    # and the result loads through create_model
    loaded = wszoo.create_model("dm_nfnet_f0", checkpoint_path=str(out))
    assert torch.equal(loaded.stem.conv1.weight, src.stem.conv1.weight)


def test_convert_bad_input(tmp_path, capsys):
    (tmp_path / "x.npz").write_bytes(b"garbage")
    assert main(["convert", str(tmp_path / "x.npz"), "--source", "deepmind-nfnet", "--model", "dm_nfnet_f0",
                 "-o", str(tmp_path / "o")]) == 2
    assert "neither an .npz nor a pickled Haiku" in capsys.readouterr().err
