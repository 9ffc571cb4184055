"""The timm model API and a forward/backward at small input, per registered CNN.

`make test` runs both on one model per code path (tests/models/variants.py); every other registered CNN (deeper
or wider copies of the same modules, and those over 100M parameters: minutes and several GB for a
forward/backward on 2 cores) runs them in the slow set (`make test-slow`)."""
import pytest
import torch
from timm.data import create_transform, resolve_data_config

import wszoo
from tests.models.variants import CNNS, REPRESENTATIVES

ALL = CNNS


def _param_count(name: str) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in wszoo.create_model(name).parameters())


def _params(names):
    return [n if n in REPRESENTATIVES else pytest.param(n, marks=pytest.mark.slow) for n in names]


# over 100M parameters: forward/backward in the slow set only; the API checks skip them (minutes each, several GB)
LARGE = {n for n in ALL if _param_count(n) > 100e6}
PARAMS = _params(ALL)


@pytest.mark.parametrize("name", PARAMS)
def test_forward_backward(name):
    torch.manual_seed(0)
    model = wszoo.create_model(name, num_classes=10)
    x = torch.randn(2, model.in_chans, 64, 64)
    out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.logsumexp(1).mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, f"parameters without a finite gradient: {no_grad[:5]}"


@pytest.mark.parametrize("name", _params(n for n in ALL if n not in LARGE))
def test_timm_api(name):
    torch.manual_seed(0)
    model = wszoo.create_model(name).eval()
    x = torch.randn(1, model.in_chans, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape[1] == model.num_features
        assert feats.shape[-1] == 64 // model.feature_info[-1]["reduction"]
        pre = model.forward_head(feats, pre_logits=True)
        assert pre.shape == (1, model.num_features)
        assert torch.equal(model.forward_head(feats), model(x))
        assert model.get_classifier().weight.shape[0] == model.pretrained_cfg["num_classes"]

        model.reset_classifier(0)
        assert model(x).shape == (1, model.num_features) and model.num_classes == 0
        model.reset_classifier(5, global_pool="catavgmax")
        assert model(x).shape == (1, 5) and model.get_classifier().weight.shape[1] == 2 * model.num_features

    modules = dict(model.named_modules())
    assert all(f["module"] in modules for f in model.feature_info)
    reductions = [f["reduction"] for f in model.feature_info]
    expected = [1, 1, 2, 4] if name.startswith("resnet_mini") else [2, 4, 8, 16, 32]  # 28 px nets keep resolution
    assert reductions == expected
    assert model.feature_info[-1]["num_chs"] == model.num_features

    cfg = model.pretrained_cfg
    assert cfg["architecture"] == name
    assert cfg["first_conv"] in modules and cfg["classifier"] in modules
    data_cfg = resolve_data_config({}, model=model)
    assert data_cfg["input_size"] == cfg["input_size"] and data_cfg["mean"] == cfg["mean"]
    assert create_transform(**data_cfg) is not None


def test_grad_checkpointing_gives_the_same_gradients():
    for name in ("resnet50_gn_ws", "resnetv2_50x1_bit", "nf_regnet_b0"):
        torch.manual_seed(0)
        model = wszoo.create_model(name, num_classes=3)
        x = torch.randn(2, 3, 32, 32)
        model(x).sum().backward()
        plain = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        model.set_grad_checkpointing(True)
        model(x).sum().backward()
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, plain[n], msg=lambda m, name=name, n=n: f"{name}.{n}: {m}")


def test_drop_rate_only_acts_in_train_mode():
    torch.manual_seed(0)
    model = wszoo.create_model("resnet50_gn_ws", drop_rate=0.5, drop_path_rate=0.2)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        model.train()
        assert not torch.equal(model(x), model(x))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="output_stride must be 8, 16 or 32"):
        wszoo.create_model("resnet50_gn_ws", output_stride=4)
    with pytest.raises(ValueError, match="unknown weight-standardization style"):
        wszoo.create_model("resnetv2_50x1_bit", ws_style="nope")
    with pytest.raises(TypeError):
        wszoo.create_model("resnet50_gn_ws", not_an_argument=1)
