"""convert_to_ws on torchvision and timm networks: keys kept, policy honoured, converted layers equal a
transcription of WS on the original weights, nothing applied on error."""
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from timm.layers import Conv2dSame
from timm.layers.padding import pad_same

import wszoo
from wszoo.layers import WSConv2d, WSConv2dSame, WSLinear, WSPolicy, convert_to_ws, is_ws_layer

from .test_standardize import REFERENCES


def _conv_inputs_and_outputs(model, x):
    """Every converted layer's input and output in one forward."""
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: seen.__setitem__(name, (mod, inp[0], out)))
             for name, m in model.named_modules() if is_ws_layer(m)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("style", ["timm", "qiao"])
def test_torchvision_resnet_keeps_keys_and_computes_ws_of_its_weights(style):
    torch.manual_seed(0)
    model = torchvision.models.resnet18().double().eval()
    before = model.state_dict()
    plain_convs = [n for n, m in model.named_modules() if type(m) is nn.Conv2d]
    report = convert_to_ws(model, style=style)
    assert list(report.converted) == plain_convs and not report.norms and not report.dropped_keys
    assert report.skipped == {"fc": "linear layer (policy.linear is False)"}
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(after[k] is before[k] or torch.equal(after[k], before[k]) for k in before)
    assert model.conv1.weight.data_ptr() == before["conv1.weight"].data_ptr(), "parameters shared, not copied"
    seen = _conv_inputs_and_outputs(model, torch.randn(1, 3, 64, 64, dtype=torch.float64))
    assert set(seen) == set(plain_convs)
    for name, (layer, inp, out) in seen.items():
        w = REFERENCES[style](layer.weight.detach(), layer.ws_eps)
        expected = F.conv2d(inp, w, None, layer.stride, layer.padding, layer.dilation, layer.groups)
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10, msg=name)
    # a checkpoint of the original still loads strictly
    model.load_state_dict(torchvision.models.resnet18().double().state_dict())


def test_batchnorm_to_groupnorm_shares_affines_and_reports_dropped_statistics():
    model = torchvision.models.resnet18()
    original = model.state_dict()
    bn_names = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    report = convert_to_ws(model, norm="gn")
    assert list(report.norms) == bn_names
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert model.bn1.num_groups == 32 and model.layer4[0].bn2.num_groups == 32
    assert report.dropped_keys == [f"{n}.{k}" for n in bn_names for k in ("running_mean", "running_var",
                                                                          "num_batches_tracked")]
    assert set(original) - set(model.state_dict()) == set(report.dropped_keys)
    result = model.load_state_dict(original, strict=False)
    assert not result.missing_keys and set(result.unexpected_keys) == set(report.dropped_keys)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 1000)
    text = str(report)
    assert text.startswith("converted 20 layer(s) to WS, kept 1 plain, replaced 20 norm(s)")
    assert "plain fc: linear layer" in text and "state-dict keys dropped: 60" in text


def test_depthwise_convs_are_skipped_by_default():
    model = torchvision.models.mobilenet_v2()
    depthwise = [n for n, m in model.named_modules()
                 if isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels]
    assert len(depthwise) == 17
    report = convert_to_ws(model, norm="gn")
    assert all(report.skipped[n] == "depthwise conv (policy.skip_depthwise)" for n in depthwise)
    assert all(type(model.get_submodule(n)) is nn.Conv2d for n in depthwise)
    # widths that 32 does not divide get the largest divisor below it
    assert model.features[3].conv[1][1].num_channels == 144 and model.features[3].conv[1][1].num_groups == 24
    model.eval()
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    everything = torchvision.models.mobilenet_v2()
    report = convert_to_ws(everything, policy=WSPolicy(skip_depthwise=False))
    assert all(n in report.converted for n in depthwise)


def test_policy_min_fan_in_skip_patterns_and_linears_on_convnext():
    model = torchvision.models.convnext_tiny()
    policy = WSPolicy(min_fan_in=100, skip=("features.0.*",), linear=True)
    report = convert_to_ws(model, style="bcn", policy=policy)
    assert report.skipped["features.0.0"] == "named in policy.skip"  # the 4x4 stem (fan-in 48)
    assert report.skipped["features.1.0.block.0"] == "depthwise conv (policy.skip_depthwise)"
    assert report.skipped["features.1.0.block.3"] == "fan-in 96 < policy.min_fan_in 100"  # the MLP's Linear(96, 384)
    assert isinstance(model.features[1][0].block[5], WSLinear)  # and its Linear(384, 96)
    assert isinstance(model.classifier[2], WSLinear) and model.classifier[2].ws_style == "bcn"
    small = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3))  # fan-in 9 and 36
    report = convert_to_ws(small, policy=WSPolicy(min_fan_in=16))
    assert report.skipped == {"0": "fan-in 9 < policy.min_fan_in 16"} and list(report.converted) == ["1"]


def test_timm_model_same_padding_norm_act_and_already_standardized_layers():
    torch.manual_seed(1)
    model = timm.create_model("tf_efficientnet_b0", pretrained=False).eval()
    assert any(type(m) is Conv2dSame for m in model.modules())
    report = convert_to_ws(model, norm="gn")
    same = [m for m in model.modules() if isinstance(m, WSConv2dSame)]
    assert same and all(m.groups == m.in_channels for m in model.modules() if type(m) is Conv2dSame), \
        "only the (skipped) depthwise convs keep timm's Conv2dSame"
    layer = same[0]
    x = torch.randn(1, layer.in_channels, 17, 17)
    expected = F.conv2d(pad_same(x, layer.kernel_size, layer.stride, layer.dilation),
                        REFERENCES["timm"](layer.weight.detach(), layer.ws_eps), layer.bias, layer.stride, 0,
                        layer.dilation, layer.groups)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    # timm's BatchNormAct2d becomes GroupNormAct with the same activation module
    assert type(model.bn1).__name__ == "GroupNormAct" and isinstance(model.bn1.act, nn.SiLU)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    assert "bn1" in report.norms
    bit = timm.create_model("resnetv2_50x1_bit", pretrained=False)
    report = convert_to_ws(bit)
    assert not report.converted and report.skipped["stem.conv"] == "already weight-standardized (StdConv2d)"
    assert report.skipped["head.fc"] == "the model's classifier (policy.skip_classifier)"  # a 1x1 conv
    assert list(convert_to_ws(bit, policy=WSPolicy(skip_classifier=False)).converted) == ["head.fc"]


def test_shared_layers_map_to_one_ws_layer():
    conv = nn.Conv2d(3, 3, 3, padding=1)
    model = nn.Sequential(conv, nn.ReLU(), conv)
    report = convert_to_ws(model)
    assert list(report.converted) == ["0"] and model[0] is model[2] and isinstance(model[0], WSConv2d)


def test_errors_leave_the_model_untouched():
    model = torchvision.models.resnet18()
    types_before = [type(m) for m in model.modules()]
    for kwargs, error, match in [
        (dict(style="nope"), ValueError, "unknown weight-standardization style"),
        (dict(norm="ln"), ValueError, "norm must be one of"),
        (dict(gn_groups=0), ValueError, "gn_groups must be a positive int"),
        (dict(policy={"min_fan_in": 4}), TypeError, "policy must be a wszoo.layers.WSPolicy"),
    ]:
        with pytest.raises(error, match=match):
            convert_to_ws(model, **kwargs)
        assert [type(m) for m in model.modules()] == types_before
    with pytest.raises(ValueError, match="min_fan_in must be an int >= 2"):
        WSPolicy(min_fan_in=1)
    with pytest.raises(TypeError, match="skip takes layer names"):
        WSPolicy(skip=(3,))
    with pytest.raises(ValueError, match="wrap a single layer"):
        convert_to_ws(nn.Conv2d(3, 3, 3))


def test_converted_model_trains_folds_and_reports_through_the_top_level_api():
    torch.manual_seed(2)
    model = torchvision.models.resnet18(num_classes=4)
    report = wszoo.convert_to_ws(model, style="qiao", norm="gn")
    assert isinstance(report, wszoo.ConversionReport) and len(report.converted) == 20
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([0, 3])
    F.cross_entropy(model(x), y).backward()
    assert model.conv1.weight.grad is not None and model.bn1.weight.grad is not None
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(wszoo.fold_ws(model)(x), model(x), rtol=1e-4, atol=1e-4)


def test_subclasses_are_reported_not_converted():
    class Custom(nn.Conv2d):
        pass

    model = nn.Sequential(Custom(3, 4, 3), nn.MultiheadAttention(8, 2))
    report = convert_to_ws(model, policy=WSPolicy(linear=True))
    assert report.skipped == {
        "0": "Custom is a subclass of Conv2d; only exact nn.Conv2d layers are converted",
        "1.out_proj": "NonDynamicallyQuantizableLinear is a subclass of Linear; "
                      "only exact nn.Linear layers are converted",
    }
    assert not report.converted and type(model[0]) is Custom


@pytest.mark.parametrize("builder", ["resnext50_32x4d", "efficientnet_b0", "mobilenet_v3_small", "convnext_tiny"])
def test_torchvision_families_convert_keep_keys_and_train(builder):
    torch.manual_seed(3)
    model = getattr(torchvision.models, builder)(num_classes=5)
    keys = list(model.state_dict())
    report = convert_to_ws(model, style="timm")
    assert report.converted and list(model.state_dict()) == keys
    grouped = [n for n, m in model.named_modules() if isinstance(m, WSConv2d) and m.groups > 1]
    if builder == "resnext50_32x4d":
        assert len(grouped) == 16  # the 3x3 group convs (32 groups) are standardized per filter
    assert not any(isinstance(m, WSConv2d) and m.groups == m.in_channels > 1 for m in model.modules())
    report = convert_to_ws(model, norm="gn")  # converting again: WS layers stay, BatchNorms go
    assert not report.converted and all("already weight-standardized" in r or "linear" in r or "depthwise" in r
                                        for r in report.skipped.values())
    out = model(torch.randn(2, 3, 64, 64))
    F.cross_entropy(out, torch.tensor([0, 4])).backward()
    assert out.shape == (2, 5) and all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_layers_with_hooks_or_computed_weights_are_left_alone():
    from torch.nn.utils import weight_norm

    hooked, normed = nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3)
    hooked.register_forward_hook(lambda *args: None)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the old-style weight_norm is deprecated
        weight_norm(normed)
    model = nn.Sequential(hooked, normed, nn.Conv2d(4, 4, 3))
    report = convert_to_ws(model)
    reason = "has hooks or a computed weight (e.g. weight_norm, spectral_norm); a WS twin would drop them"
    assert report.skipped == {"0": reason, "1": reason} and list(report.converted) == ["2"]
    assert model[0] is hooked and model[1] is normed
    bn = nn.BatchNorm2d(4)
    bn.register_forward_pre_hook(lambda *args: None)
    report = convert_to_ws(nn.Sequential(nn.Conv2d(4, 4, 3), bn), norm="gn")
    assert report.skipped == {"1": "BatchNorm with hooks; a GroupNorm in its place would drop them"}
    assert not report.norms
