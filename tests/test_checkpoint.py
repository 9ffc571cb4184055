"""load_checkpoint: every bad file gives one clear error and leaves the model exactly as it was."""
import pickle

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

import wszoo
from wszoo.checkpoint import CheckpointError, load_checkpoint


@pytest.fixture
def model():
    torch.manual_seed(0)
    return wszoo.create_model("resnet50_gn_ws", num_classes=4)


def snapshot(model: nn.Module):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def good_state(model):
    return {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}


def write(tmp_path, tensors, name="model.safetensors"):
    path = tmp_path / name
    save_file(tensors, str(path))
    return path


def test_valid_file_loads(model, tmp_path):
    state = good_state(model)
    load_checkpoint(model, write(tmp_path, state))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def make_bad(kind, model, tmp_path):
    state = good_state(model)
    if kind == "missing_file":
        return tmp_path / "nope.safetensors", "does not exist"
    if kind == "directory":
        return tmp_path, "is not a file"
    if kind == "empty":
        (tmp_path / "e.safetensors").write_bytes(b"")
        return tmp_path / "e.safetensors", "empty or truncated"
    if kind == "random_bytes":
        noise = torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes()
        (tmp_path / "r.safetensors").write_bytes(noise[1:] + b"\x00")
        return tmp_path / "r.safetensors", "not a readable safetensors file"
    if kind == "truncated":
        path = write(tmp_path, state)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return path, "not a readable safetensors file"
    if kind == "pickle_suffix":
        path = tmp_path / "model.pth"
        torch.save(state, path)
        return path, "looks like a pickle"
    if kind == "pickle_content":
        path = tmp_path / "model.safetensors"
        path.write_bytes(pickle.dumps({"a": 1}))
        return path, "looks like a pickle"
    if kind == "wrong_shape":
        state["fc.weight"] = torch.randn(5, 2048)
        return write(tmp_path, state), r"shape mismatches \(1\): fc.weight: checkpoint \(5, 2048\) vs model \(4, 2048\)"
    if kind == "missing_key":
        del state["layer4.2.conv3.weight"]
        return write(tmp_path, state), r"missing keys \(1\): layer4.2.conv3.weight"
    if kind == "extra_key":
        state["head.fc.weight"] = torch.randn(2)
        return write(tmp_path, state), r"unexpected keys \(1\): head.fc.weight"
    raise AssertionError(kind)


BAD = ["missing_file", "directory", "empty", "random_bytes", "truncated", "pickle_suffix", "pickle_content",
       "wrong_shape", "missing_key", "extra_key"]


@pytest.mark.parametrize("kind", BAD)
def test_bad_files_raise_and_leave_model_untouched(kind, model, tmp_path):
    path, match = make_bad(kind, model, tmp_path)
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=match) as info:
        load_checkpoint(model, str(path))
    assert str(path) in str(info.value)
    assert_unchanged(model, before)


def test_create_model_with_bad_checkpoint_raises(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="x.safetensors"):
        wszoo.create_model("resnet50_gn_ws", checkpoint_path=str(path))


def test_non_strict_allows_partial_but_not_bad_shapes(model, tmp_path):
    state = {k: v for k, v in good_state(model).items() if not k.startswith("fc.")}
    before_fc = model.fc.weight.clone()
    load_checkpoint(model, write(tmp_path, state), strict=False)
    assert torch.equal(model.fc.weight, before_fc)
    state["fc.weight"] = torch.randn(9, 2048)
    before = snapshot(model)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_checkpoint(model, write(tmp_path, state, "b.safetensors"), strict=False)
    assert_unchanged(model, before)
