"""p4 group convolutions: exact equivariance with WS, the orbit fan-in statistics, and a reference
transcription of the group correlation (Cohen & Welling 2016, eq. 10-11)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import wszoo
from wszoo.layers import (
    WS_STYLES,
    P4Conv2d,
    P4OrientationPool,
    P4WSConv2d,
    p4_filter_bank,
    rotate_p4,
    standardize_weight,
)


def _net(style="timm"):
    return nn.Sequential(
        P4WSConv2d(3, 8, 3, lifting=True, style=style), nn.GroupNorm(4, 8), nn.ReLU(),
        P4WSConv2d(8, 8, 5, bias=True, style=style), nn.GroupNorm(4, 8), nn.ReLU(),
        P4WSConv2d(8, 6, 3, style=style),
    ).double()


@pytest.mark.parametrize("style", WS_STYLES)
def test_ws_p4_network_is_exactly_equivariant_to_quarter_turns(style):
    torch.manual_seed(0)
    net = _net(style)
    for layer in net:
        if isinstance(layer, P4Conv2d):
            with torch.no_grad():  # uneven filter means and scales, so standardization really acts
                layer.weight.mul_(torch.rand(layer.weight.shape[0], *[1] * (layer.weight.dim() - 1),
                                             dtype=torch.float64) * 3).add_(0.2)
    x = torch.randn(2, 3, 13, 13, dtype=torch.float64)
    out = net(x)
    assert out.shape == (2, 6, 4, 13, 13)
    for turns in (1, 2, 3):
        torch.testing.assert_close(net(rotate_p4(x, turns)), rotate_p4(out, turns), rtol=1e-10, atol=1e-10)
    # the check can fail: rotating the filters without shifting their orientation axis breaks equivariance
    w = net[3].standardized_weight()
    no_shift = torch.stack([torch.rot90(w, r, dims=(-2, -1)) for r in range(4)], 1).reshape(32, 32, 5, 5)
    conv = lambda t: F.conv2d(t.flatten(1, 2), no_shift, padding=2).unflatten(1, (8, 4))  # noqa: E731
    h, h_rotated = net[:3](x), net[:3](rotate_p4(x))
    assert not torch.allclose(conv(h_rotated), rotate_p4(conv(h)), atol=1e-6)


def test_strided_layer_is_equivariant_on_a_symmetric_grid():
    torch.manual_seed(1)
    lift = P4WSConv2d(2, 4, 3, lifting=True, stride=2).double()
    x = torch.randn(1, 2, 11, 11, dtype=torch.float64)  # (11 - 1) / 2: the strided grid maps to itself
    torch.testing.assert_close(lift(rotate_p4(x)), rotate_p4(lift(x)), rtol=1e-10, atol=1e-10)


def test_orientation_pool_and_global_pool_make_a_rotation_invariant_feature():
    torch.manual_seed(2)
    net = nn.Sequential(_net(), P4OrientationPool("max"), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    for turns in (1, 2, 3):
        torch.testing.assert_close(net(rotate_p4(x, turns)), net(x), rtol=1e-10, atol=1e-10)
    p4_map = torch.randn(1, 2, 4, 3, 3)
    torch.testing.assert_close(P4OrientationPool("mean")(p4_map), p4_map.mean(2))
    with pytest.raises(ValueError, match="mode must be"):
        P4OrientationPool("sum")
    with pytest.raises(ValueError, match=r"\(N, C, 4, H, W\)"):
        P4OrientationPool()(torch.randn(1, 2, 3, 3))


def test_group_layer_matches_a_direct_transcription_of_group_correlation():
    """[f * psi](r, p) = sum_s sum_q f(s, q) psi(r^-1 s, r^-1 (q - p)): for each output rotation r, the
    input orientation s meets the filter slice (s - r) mod 4, rotated by r."""
    torch.manual_seed(3)
    layer = P4WSConv2d(3, 2, 3, bias=True, style="qiao").double()
    x = torch.randn(1, 3, 4, 7, 7, dtype=torch.float64)
    w = standardize_weight(layer.weight.detach(), "qiao")
    expected = torch.zeros(1, 2, 4, 7, 7, dtype=torch.float64)
    for r in range(4):
        for s in range(4):
            filt = torch.rot90(w[:, :, (s - r) % 4], r, dims=(-2, -1))
            expected[:, :, r] += F.conv2d(x[:, :, s], filt, padding=1)
        expected[:, :, r] += layer.bias.detach().view(1, -1, 1, 1)
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)


def test_standardization_is_over_the_whole_orbit_fan_in():
    layer = P4WSConv2d(3, 5, 3, eps=1e-12)
    assert layer.weight.shape == (5, 3, 4, 3, 3)
    flat = layer.standardized_weight().reshape(5, -1)
    assert flat.shape[1] == 3 * 4 * 3 * 3
    torch.testing.assert_close(flat.mean(1), torch.zeros(5), atol=1e-6, rtol=0)
    torch.testing.assert_close(flat.var(1, correction=0), torch.ones(5), atol=1e-4, rtol=0)
    # every rotated copy in the bank is standardized too (the statistics are permutation-invariant)
    bank = p4_filter_bank(layer.standardized_weight(), lifting=False).reshape(20, -1)
    torch.testing.assert_close(bank.var(1, correction=0), torch.ones(20), atol=1e-4, rtol=0)


def test_fold_cache_and_accumulate_work_on_p4_layers():
    torch.manual_seed(4)
    net = _net("bcn").float()
    x = torch.randn(2, 3, 9, 9)
    folded = wszoo.fold_ws(net.eval())
    assert not any(wszoo.layers.is_ws_layer(m) for m in folded.modules())
    assert isinstance(folded[0], P4Conv2d) and not isinstance(folded[0], P4WSConv2d)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net(x), rtol=1e-5, atol=1e-5)
        assert net[0].forward_weight() is net[0].forward_weight()  # cached in eval
    net.train()
    net(x).square().mean().backward()
    direct = [p.grad.clone() for p in net.parameters()]
    net.zero_grad(set_to_none=True)
    with wszoo.accumulate_ws(net):
        net(x[:1]).square().mean().mul(0.5).backward()
        net(x[1:]).square().mean().mul(0.5).backward()
    # GroupNorm is per sample, so two half-batches give the batch's gradient
    for g, p in zip(direct, net.parameters(), strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5)


def test_bad_arguments_and_inputs_are_named():
    with pytest.raises(ValueError, match="odd square kernel"):
        P4WSConv2d(3, 4, 2)
    with pytest.raises(ValueError, match="odd square kernel"):
        P4WSConv2d(3, 4, (3, 3))
    with pytest.raises(ValueError, match="unknown weight-standardization style"):
        P4WSConv2d(3, 4, 3, style="nope")
    with pytest.raises(ValueError, match="lifting=True"):
        P4WSConv2d(3, 4, 3)(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"lifting p4 layer takes \(N, 3, H, W\)"):
        P4WSConv2d(3, 4, 3, lifting=True)(torch.randn(1, 3, 4, 8, 8))
    with pytest.raises(ValueError, match="stride must be an int >= 1"):
        P4WSConv2d(3, 4, 3, stride=(1, 2))
    with pytest.raises(ValueError, match="fan-in of at least 2"):
        P4WSConv2d(1, 4, 1, lifting=True)
