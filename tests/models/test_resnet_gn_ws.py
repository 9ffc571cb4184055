"""GN+WS ResNet/ResNeXt against torchvision's ResNet (GroupNorm(32)) run on Qiao-standardized weights.

`make test` compares resnet50_gn_ws and resnext50_32x4d_gn_ws; their 101-layer copies (the same blocks, deeper)
run in the slow set."""
from functools import partial

import pytest
import torch
import torch.nn as nn
from torchvision.models.resnet import Bottleneck, ResNet

import wszoo
from tests.helpers import randomize_, rel_diff
from tests.layers.test_standardize import ref_qiao

TORCHVISION_CONFIGS = {
    "resnet50_gn_ws": dict(layers=[3, 4, 6, 3]),
    "resnet101_gn_ws": dict(layers=[3, 4, 23, 3]),
    "resnext50_32x4d_gn_ws": dict(layers=[3, 4, 6, 3], groups=32, width_per_group=4),
    "resnext101_32x4d_gn_ws": dict(layers=[3, 4, 23, 3], groups=32, width_per_group=4),
}


def torchvision_reference(name: str, state_dict, **kwargs) -> nn.Module:
    """torchvision's ResNet with GN(32) norms, loaded with our keys, convs replaced by their WS weights."""
    cfg = dict(TORCHVISION_CONFIGS[name])
    tv = ResNet(Bottleneck, cfg.pop("layers"), norm_layer=partial(nn.GroupNorm, 32), **cfg, **kwargs)
    tv.to(next(iter(state_dict.values())).dtype)
    tv.load_state_dict(state_dict, strict=True)  # exactly torchvision's key layout
    with torch.no_grad():
        for m in tv.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.copy_(ref_qiao(m.weight.double(), 1e-5).to(m.weight.dtype))
    return tv.eval()


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if "101" in n else n
                                  for n in sorted(TORCHVISION_CONFIGS)])
def test_matches_torchvision_on_standardized_weights(name):
    """float64 isolates the formula and the wiring (~1e-15); float32 shows the rounding users get."""
    torch.manual_seed(0)
    ours = randomize_(wszoo.create_model(name), seed=1).eval()
    x = torch.randn(2, 3, 64, 64)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 5e-4)):
        ours = ours.to(dtype)
        ref = torchvision_reference(name, ours.state_dict())
        with torch.no_grad():
            diff = rel_diff(ours(x.to(dtype)), ref(x.to(dtype)))
        print(f"{name} {dtype}: max relative difference vs torchvision reference {diff:.2e}")
        assert diff < tol


def test_state_dict_is_torchvision_layout():
    keys = list(wszoo.create_model("resnet50_gn_ws").state_dict())
    assert keys[:3] == ["conv1.weight", "bn1.weight", "bn1.bias"]
    assert "layer1.0.downsample.0.weight" in keys and "layer1.0.downsample.1.weight" in keys
    assert keys[-2:] == ["fc.weight", "fc.bias"]
    model = wszoo.create_model("resnext50_32x4d_gn_ws")
    assert isinstance(model.bn1, nn.GroupNorm) and model.bn1.num_groups == 32
    assert model.layer1[0].conv2.groups == 32 and model.layer1[0].conv2.out_channels == 128
    assert all(m.ws_style == "qiao" and m.ws_eps == 1e-5 for m in model.modules() if wszoo.layers.is_ws_layer(m))


def test_output_stride_dilates_like_torchvision():
    torch.manual_seed(0)
    ours = randomize_(wszoo.create_model("resnet50_gn_ws", output_stride=8), seed=2).eval()
    ref = torchvision_reference("resnet50_gn_ws", ours.state_dict(),
                                replace_stride_with_dilation=[False, True, True])
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        feats = ours.forward_features(x)
        assert feats.shape[-1] == 8
        assert rel_diff(ours(x), ref(x)) < 5e-4
    assert [f["reduction"] for f in ours.feature_info] == [2, 4, 8, 8, 8]


def test_in_chans_and_zero_init_last():
    model = wszoo.create_model("resnet50_gn_ws", in_chans=1, num_classes=7, zero_init_last=True)
    assert model.conv1.weight.shape[1] == 1
    assert model(torch.randn(1, 1, 32, 32)).shape == (1, 7)
    assert all(b.bn3.weight.abs().sum() == 0 for b in model.layer1)
