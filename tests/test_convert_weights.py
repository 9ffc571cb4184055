"""DeepMind NFNet (Haiku) -> wszoo conversion on synthetic parameters written in DeepMind's layout."""
import os
import pickle
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import wszoo
from tests.helpers import randomize_
from wszoo.checkpoint import CheckpointError
from wszoo.models.nfnet import MODEL_CFGS, NormFreeNet, haiku_params_to_state_dict
from wszoo.tools.convert_weights import convert_deepmind_nfnet, read_haiku_params

TINY_DM_ARGS = dict(depths=(1, 2, 1, 1), channels=(32, 64, 96, 128), stem_chs=32, group_size=16)
TINY_DM = replace(MODEL_CFGS["dm_nfnet_f0"], **TINY_DM_ARGS)


def to_haiku(model) -> dict:
    """Write a dm-style model's weights the way DeepMind's Haiku NFNet names and lays them out."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    hwio = lambda w: np.ascontiguousarray(w.transpose(2, 3, 1, 0))  # noqa: E731  OIHW -> HWIO
    params = {}

    def conv(hk_name, ours):
        params[f"{hk_name}/w"] = hwio(sd[f"{ours}.weight"])
        params[f"{hk_name}/b"] = sd[f"{ours}.bias"]
        params[f"{hk_name}/gain"] = sd[f"{ours}.gain"].reshape(-1)

    for i in range(4):
        conv(f"NFNet/~/stem_conv{i}", f"stem.conv{i + 1}")
    k = 0
    for s, stage in enumerate(model.stages):
        for b, block in enumerate(stage):
            hk = "NFNet/~/nf_block" + (f"_{k}" if k else "")
            ours = f"stages.{s}.{b}"
            for hk_part, our_part in (("conv0", "conv1"), ("conv1", "conv2"), ("conv1b", "conv2b"), ("conv2", "conv3")):
                conv(f"{hk}/~/{hk_part}", f"{ours}.{our_part}")
            if block.downsample is not None:
                conv(f"{hk}/~/conv_shortcut", f"{ours}.downsample.conv")
            for hk_part, our_part in (("linear", "fc1"), ("linear_1", "fc2")):
                params[f"{hk}/~/squeeze_excite/~/{hk_part}/w"] = sd[f"{ours}.attn_last.{our_part}.weight"][:, :, 0, 0].T
                params[f"{hk}/~/squeeze_excite/~/{hk_part}/b"] = sd[f"{ours}.attn_last.{our_part}.bias"]
            params[f"{hk}/skip_gain"] = sd[f"{ours}.skipinit_gain"]
            k += 1
    conv("NFNet/~/final_conv", "final_conv")
    params["NFNet/~/linear/w"] = sd["head.fc.weight"].T
    params["NFNet/~/linear/b"] = sd["head.fc.bias"]
    return params


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return randomize_(NormFreeNet(TINY_DM, num_classes=7), seed=11).eval()


def assert_same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_npz_round_trip(tiny, tmp_path):
    params = to_haiku(tiny)
    np.savez(tmp_path / "F_tiny_haiku.npz", **params)
    target = NormFreeNet(TINY_DM, num_classes=7).eval()
    target.load_state_dict(haiku_params_to_state_dict(read_haiku_params(str(tmp_path / "F_tiny_haiku.npz")), target))
    assert_same_model(target, tiny)


def test_deepminds_pickled_release_format(tiny, tmp_path):
    nested = {}
    for key, value in to_haiku(tiny).items():
        module, param = key.rsplit("/", 1)
        nested.setdefault(module, {})[param] = value
    path = tmp_path / "F0_haiku.npz"  # the release files are pickles despite the suffix
    path.write_bytes(pickle.dumps(nested, protocol=4))
    flat = read_haiku_params(str(path))
    assert set(flat) == set(to_haiku(tiny))
    target = NormFreeNet(TINY_DM, num_classes=7).eval()
    target.load_state_dict(haiku_params_to_state_dict(flat, target))
    assert_same_model(target, tiny)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickles_with_code_are_refused(tmp_path):
    path = tmp_path / "evil.npz"
    path.write_bytes(pickle.dumps({"NFNet/~/linear": {"w": _Evil()}}))
    with pytest.raises(CheckpointError, match="refusing to unpickle .*system"):
        read_haiku_params(str(path))
    (tmp_path / "junk.npz").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="neither an .npz nor a pickled Haiku"):
        read_haiku_params(str(tmp_path / "junk.npz"))
    with pytest.raises(CheckpointError, match="does not exist"):
        read_haiku_params(str(tmp_path / "missing.npz"))


def test_unknown_and_missing_parameters_are_named(tiny):
    target = NormFreeNet(TINY_DM, num_classes=7)
    params = to_haiku(tiny)
    params["NFNet/~/nf_block_9/~/conv0/w"] = np.zeros((1, 1, 1, 1), np.float32)
    with pytest.raises(CheckpointError, match="no place in NormFreeNet: NFNet/~/nf_block_9/~/conv0/w"):
        haiku_params_to_state_dict(params, target)
    params = to_haiku(tiny)
    del params["NFNet/~/nf_block_2/~/conv1b/gain"]
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): stages.1.1.conv2b.gain"):
        haiku_params_to_state_dict(params, target)


def test_real_dm_nfnet_f0_layout_maps_completely():
    """F0's real layout (12 blocks named nf_block .. nf_block_11 across 4 stages): every parameter maps."""
    torch.manual_seed(0)
    model = wszoo.create_model("dm_nfnet_f0")
    params = to_haiku(model)
    assert len(params) == len(model.state_dict())
    assert "NFNet/~/nf_block_11/skip_gain" in params and "NFNet/~/nf_block_3/~/conv_shortcut/w" in params
    converted = haiku_params_to_state_dict(params, model)
    assert all(torch.equal(converted[k], v) for k, v in model.state_dict().items())


def test_convert_function_writes_safetensors(tmp_path):
    torch.manual_seed(0)
    src = randomize_(NormFreeNet(TINY_DM, num_classes=7), seed=12).eval()
    np.savez(tmp_path / "tiny.npz", **to_haiku(src))
    # dm_nfnet_f0's layout at a tiny size: NFNetConfig fields pass through create_model
    model = convert_deepmind_nfnet(str(tmp_path / "tiny.npz"), "dm_nfnet_f0", out=str(tmp_path / "tiny.safetensors"),
                                   num_classes=7, **TINY_DM_ARGS)
    assert_same_model(model.eval(), src)
    saved = load_file(str(tmp_path / "tiny.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in src.state_dict().items())
