"""Registry: names, tags, pretrained cfgs read from configs/, errors, create_model kwargs."""
import pytest
import timm
import torch
from safetensors.torch import save_file

import wszoo
from wszoo.registry import split_model_name


def test_list_models_and_filters():
    names = wszoo.list_models()
    assert names[:3] == ["dm_nfnet_f0", "dm_nfnet_f1", "dm_nfnet_f2"]  # natural order: f2 before f10
    assert wszoo.list_models("resnet*")[:9] == ["resnet18_gn_ws", "resnet34_gn_ws", "resnet50_gn_ws",
                                                "resnet101_gn_ws", "resnet_mini_bcn_ws", "resnet_mini_bn",
                                                "resnet_mini_gn", "resnet_mini_gn_ws", "resnetv2_50x1_bit"]
    assert len(names) == 12 + 35 + 4 + 8  # GN+WS ResNets (and the minis), NF nets, BiT, ViT hybrids
    assert wszoo.list_models("resnext*") == ["resnext50_32x4d_gn_ws", "resnext101_32x4d_gn_ws"]
    assert wszoo.list_models(["*50x1*", "resnet101*"]) == ["resnet101_gn_ws", "resnetv2_50x1_bit"]
    assert wszoo.list_models("nothing*") == []


HYBRIDS = ["vit_tiny_r_s16_p8_*", "vit_small_r26_s32_*", "vit_base_r50_s16_*", "vit_large_r50_s32_*"]
TIMM_TAGS = [n for n in timm.list_pretrained(["resnetv2_*_bit*", "*nfnet*", "nf_*", *HYBRIDS])
             if n.split(".")[0] != "test_nfnet" and timm.models.get_pretrained_cfg(n).hf_hub_id]


def test_list_pretrained_has_every_timm_tag_of_our_architectures():
    ours = set(wszoo.list_pretrained())
    assert ours == set(wszoo.list_models(pretrained=True))
    assert {n for n in ours if wszoo.get_pretrained_cfg(n).get("hf_hub_id")} == set(TIMM_TAGS)
    published_gn_ws = {a for a in wszoo.list_models("res*_gn_ws") if "mini" not in a} - {"resnet18_gn_ws",
                                                                                          "resnet34_gn_ws"}
    assert ours - set(TIMM_TAGS) == {f"{a}.jhu_in1k" for a in published_gn_ws} | {"resnet_mini_gn_ws.fmnist"}
    assert wszoo.list_pretrained("*50x1*") == [
        "resnetv2_50x1_bit.goog_distilled_in1k", "resnetv2_50x1_bit.goog_in21k", "resnetv2_50x1_bit.goog_in21k_ft_in1k"]


@pytest.mark.parametrize("name", TIMM_TAGS)
def test_pretrained_cfg_matches_timm(name):
    ours = wszoo.get_pretrained_cfg(name)
    ref = timm.models.get_pretrained_cfg(name).to_dict()
    for key in ("num_classes", "input_size", "test_input_size", "crop_pct", "test_crop_pct", "crop_mode",
                "interpolation", "mean", "std", "first_conv", "classifier", "license", "hf_hub_id", "pool_size"):
        expected = tuple(ref[key]) if isinstance(ref.get(key), list) else ref.get(key)
        assert ours.get(key) == expected, key
    assert ours["tag"] == split_model_name(name)[1]


@pytest.mark.parametrize("arch", sorted({n.split(".")[0] for n in TIMM_TAGS}))
def test_default_tag_is_timms(arch):
    assert wszoo.get_pretrained_cfg(arch)["tag"] == timm.models.get_pretrained_cfg(arch).to_dict()["tag"]


def test_untagged_architecture_cfg():
    cfg = wszoo.get_pretrained_cfg("nf_resnet26")
    assert cfg["tag"] == "" and cfg["input_size"] == (3, 224, 224) and cfg["mean"] == (0.485, 0.456, 0.406)
    assert "hf_hub_id" not in cfg and "url" not in cfg


def test_every_tag_has_a_source_and_safetensors_or_a_checked_url():
    for name in wszoo.list_pretrained():
        cfg = wszoo.get_pretrained_cfg(name)
        if cfg.get("hf_hub_id"):
            assert cfg["hf_hub_id"] == f"timm/{name}" and cfg["hf_hub_filename"] == "model.safetensors", name
        elif cfg.get("package_dir"):
            assert cfg["package_dir"] == f"weights/{name}"
        else:
            assert cfg["url"].endswith(f"-{cfg['url_sha256_prefix']}.pth") and len(cfg["url_sha256_prefix"]) == 8
        assert cfg.get("top1") is None or (cfg.get("top1_source") and cfg.get("top1_dataset")), name


def test_unknown_names_suggest_close_matches():
    with pytest.raises(wszoo.UnknownModelError, match=r"Unknown model 'resnet50_gnws'\. Did you mean: resnet50_gn_ws"):
        wszoo.create_model("resnet50_gnws")
    with pytest.raises(wszoo.UnknownModelError, match="Unknown model 'zzz'. `wszoo list`"):
        wszoo.get_pretrained_cfg("zzz")
    with pytest.raises(wszoo.UnknownModelError, match=r"Unknown pretrained tag 'in1k'.*resnetv2_50x1_bit.goog_in21k"):
        wszoo.create_model("resnetv2_50x1_bit.in1k")
    assert not wszoo.is_model("resnetv2_50x1_bit.in1k") and wszoo.is_model("resnetv2_50x1_bit.goog_in21k")


def test_tag_sets_num_classes_and_cfg():
    with torch.device("meta"):
        model = wszoo.create_model("resnetv2_50x1_bit.goog_in21k")
        assert model.num_classes == 21843 and model.pretrained_cfg["tag"] == "goog_in21k"
        assert wszoo.create_model("resnetv2_50x1_bit.goog_in21k", num_classes=4).num_classes == 4


def test_pretrained_without_published_weights_is_refused_clearly():
    with pytest.raises(wszoo.hub.PretrainedWeightsError, match="'nf_resnet26' has no pretrained weights"):
        wszoo.create_model("nf_resnet26", pretrained=True)


def test_checkpoint_path_round_trip(tmp_path):
    torch.manual_seed(0)
    src = wszoo.create_model("resnet50_gn_ws", num_classes=3).eval()
    path = tmp_path / "model.safetensors"
    save_file({f"module.{k}": v for k, v in src.state_dict().items()}, str(path))  # DataParallel prefix
    loaded = wszoo.create_model("resnet50_gn_ws", num_classes=3, checkpoint_path=str(path)).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), src(x))


def test_register_model_rejects_duplicates_and_dots():
    def resnet50_gn_ws(**kwargs):
        return None

    with pytest.raises(ValueError, match="registered twice"):
        wszoo.register_model(resnet50_gn_ws)
    fn = lambda **kw: None  # noqa: E731
    fn.__name__ = "bad.name"
    with pytest.raises(ValueError, match="may not contain '.'"):
        wszoo.register_model(fn)


def test_model_family():
    assert wszoo.registry.model_family("resnetv2_50x1_bit.goog_in21k") == "resnetv2_bit"
    assert wszoo.registry.model_family("resnext50_32x4d_gn_ws") == "resnet_gn_ws"
    with pytest.raises(wszoo.UnknownModelError):
        wszoo.registry.model_family("vit_base")
