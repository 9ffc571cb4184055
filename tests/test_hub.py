"""Pretrained loading through the real huggingface_hub download code, offline: a hand-made HF cache and
a Hub-compatible server on 127.0.0.1 (HF_ENDPOINT)."""
import hashlib
import io
import json
import logging

import pytest
import timm
import torch
from safetensors.torch import save

import wszoo
from tests.helpers import randomize_
from tests.hub_fixtures import FakeHub, make_hf_cache
from wszoo.checkpoint import CheckpointError
from wszoo.hub import PretrainedWeightsError, load_pretrained, push_to_hub, save_pretrained

BIT = "resnetv2_50x1_bit"
BIT_TAG = "goog_distilled_in1k"  # timm's default tag for this architecture
BIT_REPO = f"timm/{BIT}.{BIT_TAG}"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def timm_bit():
    return randomize_(timm.create_model(BIT), seed=21).eval()


@pytest.fixture(scope="module")
def bit_bytes(timm_bit):
    return save({k: v.contiguous() for k, v in timm_bit.state_dict().items()})


@pytest.fixture
def hf_env(tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("WSZOO_CACHE", str(tmp_path / "wszoo-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    return cache


def same_outputs(a, b, size=64):
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


def test_pretrained_from_offline_cache_matches_timm(hf_env, monkeypatch, timm_bit, bit_bytes):
    make_hf_cache(hf_env, BIT_REPO, {"model.safetensors": bit_bytes}, COMMIT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = wszoo.create_model(BIT, pretrained=True)
    assert model.pretrained_cfg["tag"] == BIT_TAG
    assert same_outputs(model, timm_bit)
    assert same_outputs(wszoo.create_model(f"{BIT}.{BIT_TAG}", pretrained=True), timm_bit)


def test_torch_hub_load_local(hf_env, monkeypatch, timm_bit, bit_bytes):
    import pathlib

    make_hf_cache(hf_env, BIT_REPO, {"model.safetensors": bit_bytes}, COMMIT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo_dir = str(pathlib.Path(__file__).resolve().parents[1])
    model = torch.hub.load(repo_dir, BIT, source="local", pretrained=True)
    assert same_outputs(model, timm_bit)
    import hubconf  # torch.hub.list() only takes GitHub names: read the entry points as it would

    public = [n for n in dir(hubconf) if not n.startswith("_") and callable(getattr(hubconf, n))]
    detectors = ["deeplabv3_gn_ws", "fasterrcnn_gn_ws", "maskrcnn_gn_ws", "retinanet_gn_ws"]
    assert sorted(public) == sorted(wszoo.list_models() + detectors)
    assert hubconf.dependencies == ["torch", "torchvision", "timm", "huggingface_hub", "safetensors"]
    assert "pretrained: load the default published weights (resnetv2_50x1_bit.goog_distilled_in1k)" in \
        hubconf.resnetv2_50x1_bit.__doc__


def test_offline_without_cache_names_the_repo_and_the_fix(hf_env, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PretrainedWeightsError) as info:
        wszoo.create_model(BIT, pretrained=True)
    msg = str(info.value)
    assert BIT_REPO in msg and "HF_HUB_OFFLINE is set" in msg and f"hf download {BIT_REPO} model.safetensors" in msg


def test_num_classes_change_keeps_backbone_and_logs(hf_env, monkeypatch, timm_bit, bit_bytes, caplog):
    make_hf_cache(hf_env, BIT_REPO, {"model.safetensors": bit_bytes}, COMMIT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with caplog.at_level(logging.INFO, logger="wszoo"):
        model = wszoo.create_model(BIT, pretrained=True, num_classes=7)
    assert "not loading the checkpoint's classifier (head.fc.bias, head.fc.weight)" in caplog.text
    assert model.get_classifier().weight.shape[0] == 7
    assert torch.equal(model.stem.conv.weight, timm_bit.stem.conv.weight)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.forward_features(x), timm_bit.forward_features(x))
    headless = wszoo.create_model(BIT, pretrained=True, num_classes=0)
    with torch.no_grad():
        assert torch.equal(headless(x), timm_bit.forward_head(timm_bit.forward_features(x), pre_logits=True))


@pytest.mark.parametrize("in_chans", [1, 5])
def test_in_chans_adapts_the_first_conv_like_timm(hf_env, monkeypatch, timm_bit, bit_bytes, in_chans):
    make_hf_cache(hf_env, BIT_REPO, {"model.safetensors": bit_bytes}, COMMIT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = wszoo.create_model(BIT, pretrained=True, in_chans=in_chans)
    w = timm_bit.stem.conv.weight.detach()
    expected = w.sum(1, keepdim=True) if in_chans == 1 else w.repeat(1, 2, 1, 1)[:, :in_chans] * (3 / in_chans)
    torch.testing.assert_close(model.stem.conv.weight.detach(), expected)
    assert torch.equal(model.stages[0].blocks[0].conv1.weight, timm_bit.stages[0].blocks[0].conv1.weight)


def test_corrupt_cached_file_is_a_clear_error_and_leaves_model_untouched(hf_env, monkeypatch, bit_bytes):
    make_hf_cache(hf_env, BIT_REPO, {"model.safetensors": bit_bytes[: len(bit_bytes) // 3]}, COMMIT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = wszoo.create_model(BIT)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_pretrained(model, model.pretrained_cfg)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_download_through_a_hub_server_caches_and_pins(hf_env, monkeypatch, timm_bit, bit_bytes):
    with FakeHub() as hub:
        hub.add(BIT_REPO, {"model.safetensors": bit_bytes}, COMMIT)
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        model = wszoo.create_model(BIT, pretrained=True)
        assert same_outputs(model, timm_bit)
        assert hub.gets("model.safetensors") == 1
        wszoo.create_model(BIT, pretrained=True)  # second time: from the cache
        assert hub.gets("model.safetensors") == 1
        assert (hf_env / f"models--timm--{BIT}.{BIT_TAG}" / "snapshots" / COMMIT / "model.safetensors").exists()

        # a pinned revision asks for exactly that commit (in a fresh cache; a cached commit needs no request)
        monkeypatch.setenv("HF_HUB_CACHE", str(hf_env.parent / "fresh-cache"))
        pinned = {**wszoo.get_pretrained_cfg(BIT), "revision": COMMIT}
        assert same_outputs(load_pretrained(wszoo.create_model(BIT), pinned), timm_bit)
        assert any(f"/resolve/{COMMIT}/model.safetensors" in p for _, p in hub.requests)
        requests = len(hub.requests)
        load_pretrained(wszoo.create_model(BIT), pinned)
        assert len(hub.requests) == requests  # an immutable commit is served from the cache
        with pytest.raises(PretrainedWeightsError, match="revision 'f{40}' does not exist|revision '" + "f" * 40):
            load_pretrained(wszoo.create_model(BIT), {**pinned, "revision": "f" * 40})


def test_hub_404s_are_clear(hf_env, monkeypatch):
    with FakeHub() as hub:
        hub.add("someone/other", {"config.json": b"{}"}, COMMIT)
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        with pytest.raises(PretrainedWeightsError, match=rf"Hub repository '{BIT_REPO}' does not exist"):
            wszoo.create_model(BIT, pretrained=True)
        cfg = {**wszoo.get_pretrained_cfg(BIT), "hf_hub_id": "someone/other"}
        with pytest.raises(PretrainedWeightsError, match="'someone/other' has no file 'model.safetensors' at main"):
            load_pretrained(wszoo.create_model(BIT), cfg)


def test_save_pretrained_then_hf_hub_name(hf_env, monkeypatch, tmp_path):
    torch.manual_seed(0)
    src = randomize_(wszoo.create_model("nf_regnet_b0", num_classes=5, in_chans=1, drop_rate=0.1), seed=3).eval()
    out = tmp_path / "saved"
    save_pretrained(src, str(out))
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "nf_regnet_b0" and config["num_classes"] == 5
    assert config["model_args"] == {"num_classes": 5, "in_chans": 1, "global_pool": "avg"}
    assert "library_name: wszoo" in (out / "README.md").read_text()
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    with FakeHub() as hub:
        hub.add("me/my-nf", files, COMMIT)
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        for name in ("hf-hub:me/my-nf", f"hf-hub:me/my-nf@{COMMIT}"):
            model = wszoo.create_model(name, pretrained=True)
            assert model.num_classes == 5 and model.in_chans == 1
            x = torch.randn(1, 1, 48, 48)
            with torch.no_grad():
                assert torch.equal(model.eval()(x), src(x))
        assert wszoo.create_model("hf-hub:me/my-nf", pretrained=True, num_classes=2).num_classes == 2
        with pytest.raises(ValueError, match="expected 'hf-hub:org/repo"):
            wszoo.create_model("hf-hub:no-slash")


def test_save_pretrained_needs_a_wszoo_model(tmp_path):
    with pytest.raises(ValueError, match="made by wszoo.create_model"):
        save_pretrained(torch.nn.Linear(2, 2), str(tmp_path))


def test_push_to_hub_uploads_the_saved_folder(monkeypatch):
    seen = {}

    class FakeApi:
        def __init__(self, endpoint=None, token=None):
            seen["token"] = token

        def create_repo(self, repo_id, private=False, exist_ok=False):
            seen["repo"] = (repo_id, private, exist_ok)

        def upload_folder(self, repo_id, folder_path, revision=None, commit_message=""):
            import os

            seen["files"] = sorted(os.listdir(folder_path))
            seen["config"] = json.load(open(os.path.join(folder_path, "config.json")))
            return type("Info", (), {"commit_url": f"https://hub/{repo_id}/commit/1"})()

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    url = push_to_hub(wszoo.create_model("nf_regnet_b0", num_classes=3), "me/x", token="t", private=True)
    assert url == "https://hub/me/x/commit/1"
    assert seen["repo"] == ("me/x", True, True) and seen["token"] == "t"
    assert seen["files"] == ["README.md", "config.json", "model.safetensors"]
    assert seen["config"]["architecture"] == "nf_regnet_b0"


# --- original (non-Hub) checkpoints: the GN+WS authors' pickles --------------------------------------
def _pth_bytes(model, wrap="state_dict", prefix=""):
    buf = io.BytesIO()
    sd = {prefix + k: v for k, v in model.state_dict().items()}
    torch.save({wrap: sd, "epoch": 100} if wrap else sd, buf)
    return buf.getvalue()


def test_original_pickle_is_downloaded_converted_once_and_cached(hf_env, monkeypatch):
    torch.manual_seed(0)
    src = randomize_(wszoo.create_model("resnet50_gn_ws"), seed=4).eval()
    data = _pth_bytes(src)  # mmdetection's layout: {'state_dict': ...}
    with FakeHub() as hub:
        hub.raw["/resnet50_gn_ws-test.pth"] = data
        cfg = {**wszoo.get_pretrained_cfg("resnet50_gn_ws.jhu_in1k"), "url": hub.endpoint + "/resnet50_gn_ws-test.pth",
               "url_sha256_prefix": hashlib.sha256(data).hexdigest()[:8]}
        model = load_pretrained(wszoo.create_model("resnet50_gn_ws"), cfg)
        assert same_outputs(model, src, size=32)
        converted = hf_env.parent / "wszoo-cache" / "resnet50_gn_ws.jhu_in1k"
        assert sorted(p.name for p in converted.iterdir()) == ["README.md", "config.json", "model.safetensors"]
        load_pretrained(wszoo.create_model("resnet50_gn_ws"), cfg)
        assert hub.gets(".pth") == 1  # converted once, safetensors from then on


def test_original_pickle_with_wrong_hash_is_refused(hf_env):
    src = wszoo.create_model("resnet50_gn_ws")
    with FakeHub() as hub:
        hub.raw["/r.pth"] = _pth_bytes(src)
        cfg = {**wszoo.get_pretrained_cfg("resnet50_gn_ws.jhu_in1k"), "url": hub.endpoint + "/r.pth",
               "url_sha256_prefix": "00000000"}
        with pytest.raises(PretrainedWeightsError, match="expected a prefix 00000000: refusing"):
            load_pretrained(wszoo.create_model("resnet50_gn_ws"), cfg)
        assert not (hf_env.parent / "wszoo-cache" / "resnet50_gn_ws.jhu_in1k" / "model.safetensors").exists()


def test_original_pickle_offline_says_how_to_convert(hf_env, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PretrainedWeightsError, match="wszoo convert resnet50_gn_ws-15beedd8.pth --source pth --model "
                       "resnet50_gn_ws.jhu_in1k -o"):
        wszoo.create_model("resnet50_gn_ws", pretrained=True)


def test_convert_cli_qiao_pth_tar(tmp_path, capsys):
    from wszoo.cli import main

    torch.manual_seed(0)
    src = randomize_(wszoo.create_model("resnext50_32x4d_gn_ws"), seed=5).eval()
    (tmp_path / "X-50-GN-WS.pth.tar").write_bytes(_pth_bytes(src, prefix="module."))  # DataParallel save
    out = tmp_path / "converted"
    assert main(["convert", str(tmp_path / "X-50-GN-WS.pth.tar"), "--source", "pth", "--model",
                 "resnext50_32x4d_gn_ws.jhu_in1k", "-o", str(out)]) == 0
    loaded = wszoo.create_model("resnext50_32x4d_gn_ws", checkpoint_path=str(out / "model.safetensors"))
    assert same_outputs(loaded, src, size=32)
    (tmp_path / "bad.pth").write_bytes(b"\x80\x04junk")
    assert main(["convert", str(tmp_path / "bad.pth"), "--source", "pth", "--model", "resnet50_gn_ws",
                 "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "is not readable as a weights-only PyTorch checkpoint" in err and "weights_only` set to `False`" not in err


def test_weights_only_refuses_code(tmp_path):
    from wszoo.checkpoint import read_torch_checkpoint

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, ("echo pwned > /dev/null",))

    import pickle

    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"state_dict": {"a": Evil()}}))
    with pytest.raises(CheckpointError, match="not readable as a weights-only PyTorch checkpoint"):
        read_torch_checkpoint(str(tmp_path / "evil.pth"))


# --- the saved format round-trips the model as it is at save time ----------------------------------------
ROUND_TRIPS = {
    "reset_classifier": lambda: _reset(wszoo.create_model("resnet_mini_gn_ws", num_classes=10), 5, None),
    "reset_classifier_and_pool": lambda: _reset(wszoo.create_model("nf_regnet_b0", num_classes=4), 3, "catavgmax"),
    "headless": lambda: wszoo.create_model("resnet_mini_gn_ws", num_classes=0),
    "reset_to_headless": lambda: _reset(wszoo.create_model("resnet50_gn_ws", num_classes=6), 0, None),
    "one_channel": lambda: wszoo.create_model("resnetv2_50x1_bit", num_classes=3, in_chans=1),
}


def _reset(model, classes, pool):
    model.reset_classifier(classes, pool)
    return model


@pytest.mark.parametrize("case", sorted(ROUND_TRIPS))
@pytest.mark.parametrize("route", ["local-dir", "hf-hub"])
def test_saved_model_rebuilds_as_it_was_saved(case, route, hf_env, monkeypatch, tmp_path):
    torch.manual_seed(0)
    src = randomize_(ROUND_TRIPS[case](), seed=9).eval()
    out = tmp_path / "saved"
    save_pretrained(src, str(out))
    config = json.loads((out / "config.json").read_text())
    assert (config["num_classes"], config["model_args"]["in_chans"]) == (src.num_classes, src.in_chans)
    if route == "local-dir":
        loaded = wszoo.create_model(f"local-dir:{out}", pretrained=True)
    else:
        with FakeHub() as hub:
            hub.add("me/saved", {p.name: p.read_bytes() for p in out.iterdir()}, COMMIT)
            monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
            loaded = wszoo.create_model("hf-hub:me/saved", pretrained=True)
    assert (loaded.num_classes, loaded.in_chans, loaded.global_pool_type) == \
        (src.num_classes, src.in_chans, src.global_pool_type)
    x = torch.randn(2, src.in_chans, 40, 40, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), src(x))


def test_saved_class_count_outranks_stale_model_args(tmp_path):
    """A directory written before the save-time fields existed: the top-level class count decides."""
    src = wszoo.create_model("resnet_mini_gn_ws", num_classes=10)
    src.reset_classifier(5)
    out = tmp_path / "old"
    save_pretrained(src, str(out))
    config = json.loads((out / "config.json").read_text())
    config["model_args"]["num_classes"] = 10  # what the old writer recorded: the class count at creation
    config.pop("in_chans", None), config.pop("global_pool", None)
    (out / "config.json").write_text(json.dumps(config))
    assert wszoo.create_model(f"local-dir:{out}", pretrained=True).num_classes == 5
