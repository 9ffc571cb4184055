"""WS on 1-D, 3-D and transposed convolutions: against the formula, and against WSConv2d on the equivalent
reshaped problem (a 1-D conv is a 2-D conv of height 1; a transposed conv is the conv with the flipped,
transposed kernel)."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import wszoo
from wszoo.layers import (
    WS_STYLES,
    ScaledWSConv1d,
    ScaledWSConv3d,
    WSConv1d,
    WSConv2d,
    WSConv3d,
    WSConvTranspose2d,
    WSPolicy,
    convert_to_ws,
)

PLAIN_STYLES = [s for s in WS_STYLES if s not in ("timm_scaled", "deepmind", "cwn")]


def _qiao(w2d, eps=1e-5):
    """The original WS formula, by hand: (W - mean) / (std_unbiased + eps) per row."""
    return (w2d - w2d.mean(1, keepdim=True)) / (w2d.std(1, keepdim=True) + eps)


@pytest.mark.parametrize("style", PLAIN_STYLES)
def test_conv1d_is_a_2d_conv_of_height_one(style):
    torch.manual_seed(0)
    one = WSConv1d(6, 8, 5, stride=2, style=style, bias=True)
    two = WSConv2d(6, 8, (1, 5), stride=(1, 2), padding=(0, 2), style=style, bias=True)
    with torch.no_grad():
        two.weight.copy_(one.weight.unsqueeze(2))
        two.bias.copy_(one.bias)
    x = torch.randn(2, 6, 33)
    torch.testing.assert_close(one(x), two(x.unsqueeze(2)).squeeze(2))
    assert one(x).shape[-1] == 17  # timm's padding: ceil(33 / 2)


def test_conv3d_against_the_formula_and_a_2d_conv_per_frame():
    torch.manual_seed(0)
    conv = WSConv3d(4, 6, (3, 3, 3), style="qiao")
    x = torch.randn(2, 4, 5, 8, 8)
    expected = F.conv3d(x, _qiao(conv.weight.reshape(6, -1)).reshape(conv.weight.shape), padding=1)
    torch.testing.assert_close(conv(x), expected, rtol=1e-5, atol=1e-5)
    flat = WSConv3d(4, 6, (1, 3, 3), style="timm")
    two = WSConv2d(4, 6, 3, style="timm")
    with torch.no_grad():
        two.weight.copy_(flat.weight.squeeze(2))
    frames = torch.stack([two(x[:, :, t]) for t in range(5)], 2)
    torch.testing.assert_close(flat(x), frames)


@pytest.mark.parametrize("cls, shape", [(ScaledWSConv1d, (2, 4, 16)), (ScaledWSConv3d, (2, 4, 3, 6, 6))])
def test_scaled_ws_in_1d_and_3d(cls, shape):
    torch.manual_seed(0)
    conv = cls(4, 6, 3, gamma=1.7)
    with torch.no_grad():
        conv.gain.uniform_(0.5, 1.5)
    assert conv.gain.shape == (6,) + (1,) * (len(shape) - 1)
    w2d = conv.weight.reshape(6, -1)
    n = w2d.shape[1]
    # timm's ScaledStdConv: gain * gamma * n^-1/2 * (W - mean) / sqrt(var_biased + eps)
    expected = conv.gain.reshape(6, 1) * 1.7 * n ** -0.5 * (w2d - w2d.mean(1, keepdim=True)) / torch.sqrt(
        w2d.var(1, unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(conv.standardized_weight(), expected.reshape(conv.weight.shape), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="scaled style"):
        cls(4, 6, 3, style="qiao")


@pytest.mark.parametrize("groups", [1, 2])
def test_transposed_conv_standardizes_each_output_filter(groups):
    torch.manual_seed(0)
    up = WSConvTranspose2d(8, 6, 3, stride=2, padding=1, output_padding=1, groups=groups, style="qiao")
    assert up.weight.shape == (8, 6 // groups, 3, 3)
    w = up.weight.detach()
    in_g, out_g = 8 // groups, 6 // groups
    expected = torch.empty_like(w)
    for g in range(groups):  # output filter o of group g: weight[g*in_g:(g+1)*in_g, o], over its fan-in
        for o in range(out_g):
            block = w[g * in_g:(g + 1) * in_g, o]
            expected[g * in_g:(g + 1) * in_g, o] = _qiao(block.reshape(1, -1)).reshape(block.shape)
    torch.testing.assert_close(up.standardized_weight(), expected, rtol=1e-5, atol=1e-6)
    assert up.ws_fan_in() == in_g * 9
    x = torch.randn(2, 8, 5, 5)
    assert up(x).shape == (2, 6, 10, 10)


def test_transposed_conv_equals_the_conv_with_the_flipped_kernel():
    """At stride 1, conv_transpose2d(x, W, padding=p) is conv2d(x, flip(W)^T, padding=k-1-p); the transposed
    layer's output filters are that conv's filters, so the two WS layers agree."""
    torch.manual_seed(0)
    up = WSConvTranspose2d(5, 7, 3, padding=0, style="bcn")
    conv = WSConv2d(5, 7, 3, padding=2, style="bcn")
    with torch.no_grad():
        conv.weight.copy_(up.weight.flip(-1, -2).transpose(0, 1))
        conv.bias = None
        up.bias.zero_()
    x = torch.randn(2, 5, 6, 6)
    torch.testing.assert_close(up(x), conv(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make, shape", [
    (lambda: WSConv1d(4, 8, 3, bias=True), (2, 4, 20)),
    (lambda: WSConv3d(4, 8, 3, bias=True), (2, 4, 4, 6, 6)),
    (lambda: ScaledWSConv1d(4, 8, 3), (2, 4, 20)),
    (lambda: WSConvTranspose2d(4, 8, 4, stride=2, padding=1), (2, 4, 5, 5)),
])
def test_cache_fold_and_accumulate(make, shape):
    torch.manual_seed(0)
    model = nn.Sequential(make(), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
    x = torch.randn(shape)
    model(x)
    layer = model[0]
    model.eval()
    with torch.no_grad():
        first = model(x)
        assert layer.cached_weight() is not None and torch.equal(model(x), first)
        folded = wszoo.fold_ws(model)
        assert type(folded[0]) in (nn.Conv1d, nn.Conv3d, nn.ConvTranspose2d)
        torch.testing.assert_close(folded(x), first, rtol=1e-5, atol=1e-6)
    model.train()
    reference = copy.deepcopy(model)
    reference.zero_grad()
    for i in range(2):
        (reference(x[i:i + 1]).square().mean() / 2).backward()
    with wszoo.accumulate_ws(model):
        for i in range(2):
            (model(x[i:i + 1]).square().mean() / 2).backward()
    for (n, a), b in zip(reference.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6 * a.grad.abs().max().item(), msg=n)


class _AudioNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1d = nn.Conv1d(2, 8, 5)
        self.conv3d = nn.Conv3d(1, 4, 3)
        self.up = nn.ConvTranspose2d(4, 4, 2, stride=2)


def test_convert_to_ws_takes_1d_3d_and_on_request_transposed_convs():
    model = _AudioNet()
    report = convert_to_ws(model, style="qiao")
    assert isinstance(model.conv1d, WSConv1d) and isinstance(model.conv3d, WSConv3d)
    assert isinstance(model.up, nn.ConvTranspose2d) and "policy.transposed" in report.skipped["up"]
    model = _AudioNet()
    convert_to_ws(model, style="qiao", policy=WSPolicy(transposed=True))
    assert isinstance(model.up, WSConvTranspose2d)


def test_grouping_leaves_transposed_convs_to_themselves():
    torch.manual_seed(0)
    model = nn.Sequential(WSConv2d(3, 8, 3), nn.ReLU(), WSConv2d(8, 8, 3), WSConvTranspose2d(8, 4, 2, stride=2))
    reference = copy.deepcopy(model)
    wszoo.group_ws(model)
    assert wszoo.is_grouped(model) and model[3].ws_group() is None
    x = torch.randn(2, 3, 8, 8)
    model(x).square().mean().backward()
    reference(x).square().mean().backward()
    for (n, a), b in zip(reference.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, msg=n)
