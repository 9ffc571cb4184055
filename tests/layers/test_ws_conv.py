"""WS layers: outputs against plain ops on reference weights and against timm's StdConv2d."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import StdConv2d, StdConv2dSame

from wszoo.layers import (
    CWNConv2d,
    CWNLinear,
    GroupNormAct,
    ScaledWSConv2d,
    WSConv2d,
    WSConv2dSame,
    WSLinear,
    get_act_layer,
    is_ws_layer,
)

from .test_standardize import REFERENCES, ref_cwn


@pytest.mark.parametrize("style", ["timm", "qiao", "bcn"])
@pytest.mark.parametrize("groups", [1, 4])
def test_conv_output_equals_conv_with_reference_weight(style, groups):
    torch.manual_seed(0)
    conv = WSConv2d(8, 16, 3, stride=2, groups=groups, bias=True, style=style).double()
    nn.init.normal_(conv.bias)
    x = torch.randn(2, 8, 11, 11, dtype=torch.float64)
    w = REFERENCES[style](conv.weight.detach(), conv.ws_eps)
    assert conv.weight.shape[1] == 8 // groups  # fan-in per group's filter
    expected = F.conv2d(x, w, conv.bias, stride=2, padding=1, groups=groups)
    torch.testing.assert_close(conv(x), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(conv.standardized_weight(), w, rtol=1e-10, atol=1e-12)


def test_timm_style_is_bitwise_timm_stdconv():
    torch.manual_seed(1)
    ours = WSConv2d(16, 32, 3, stride=2, dilation=2, style="timm", eps=1e-8)
    ref = StdConv2d(16, 32, 3, stride=2, dilation=2, eps=1e-8)
    ref.load_state_dict(ours.state_dict())
    assert ours.padding == ref.padding
    x = torch.randn(2, 16, 20, 20)
    assert torch.equal(ours(x), ref(x))


@pytest.mark.parametrize("stride, size", [(1, 9), (2, 9), (2, 10), (2, 7)])
def test_same_padding_matches_timm(stride, size):
    torch.manual_seed(2)
    ours = WSConv2dSame(4, 8, 3, stride=stride, style="timm", eps=1e-6)
    ref = StdConv2dSame(4, 8, 3, stride=stride, eps=1e-6)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(1, 4, size, size)
    out = ours(x)
    assert out.shape[-1] == -(-size // stride)  # ceil(size / stride), TF 'SAME'
    torch.testing.assert_close(out, ref(x))


def test_same_padding_rejects_numbers():
    with pytest.raises(TypeError, match="padding mode string"):
        WSConv2dSame(4, 8, 3, padding=1)


@pytest.mark.parametrize("style", ["timm", "qiao", "bcn"])
def test_linear(style):
    torch.manual_seed(3)
    lin = WSLinear(20, 7, style=style).double()
    x = torch.randn(5, 20, dtype=torch.float64)
    w = REFERENCES[style](lin.weight.detach().reshape(7, 20, 1, 1), lin.ws_eps).reshape(7, 20)
    torch.testing.assert_close(lin(x), x @ w.T + lin.bias, rtol=1e-10, atol=1e-10)


def test_layers_keep_plain_state_dict_keys():
    assert set(WSConv2d(3, 8, 3, bias=True).state_dict()) == set(nn.Conv2d(3, 8, 3).state_dict())
    assert set(WSLinear(3, 8).state_dict()) == set(nn.Linear(3, 8).state_dict())
    plain = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    ws = WSConv2d(3, 8, 3, style="qiao")
    ws.load_state_dict(plain.state_dict())  # a plain checkpoint loads as is
    assert is_ws_layer(ws) and not is_ws_layer(plain)


def test_layer_argument_errors():
    with pytest.raises(ValueError, match="unknown weight-standardization style"):
        WSConv2d(3, 8, 3, style="torch")
    with pytest.raises(ValueError, match="eps must be > 0"):
        WSLinear(3, 8, eps=0)
    with pytest.raises(ValueError, match="fan-in of at least 2"):
        WSConv2d(4, 4, 1, groups=4)  # depthwise 1x1: one weight per filter


def test_autocast_convolves_in_low_precision_with_float32_statistics():
    torch.manual_seed(4)
    conv = WSConv2d(8, 16, 3)
    x = torch.randn(2, 8, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x)
        w = conv.standardized_weight()
    assert out.dtype == torch.bfloat16 and w.dtype == torch.float32
    ref = conv(x)
    assert (out.float() - ref).norm() / ref.norm() < 1e-2


def test_gradients_reach_weight_and_bias():
    conv = WSConv2d(4, 6, 3, bias=True, style="bcn")
    conv(torch.randn(2, 4, 6, 6)).square().mean().backward()
    assert conv.weight.grad.abs().sum() > 0 and conv.bias.grad.abs().sum() > 0


def test_group_norm_act_equals_group_norm_then_relu():
    torch.manual_seed(5)
    gn = GroupNormAct(64, num_groups=32)
    nn.init.normal_(gn.weight)
    nn.init.normal_(gn.bias)
    x = torch.randn(2, 64, 5, 5)
    torch.testing.assert_close(gn(x), F.relu(F.group_norm(x, 32, gn.weight, gn.bias, 1e-5)))
    assert set(gn.state_dict()) == {"weight", "bias"}
    torch.testing.assert_close(GroupNormAct(64, apply_act=False)(x), F.group_norm(x, 32, eps=1e-5))
    with pytest.raises(ValueError, match="divisible"):
        GroupNormAct(48, num_groups=32)


def test_act_lookup():
    assert get_act_layer("silu") is nn.SiLU and get_act_layer(nn.GELU) is nn.GELU and get_act_layer(None) is None
    with pytest.raises(ValueError, match="unknown activation 'swishy'"):
        get_act_layer("swishy")


@pytest.mark.parametrize("same", [False, True])
def test_scaled_conv_is_timm_scaled_std_conv(same):
    from timm.layers import ScaledStdConv2d, ScaledStdConv2dSame

    from wszoo.layers import NONLIN_GAMMA, ScaledWSConv2d, ScaledWSConv2dSame

    torch.manual_seed(6)
    gamma = NONLIN_GAMMA["silu"]
    ours = (ScaledWSConv2dSame if same else ScaledWSConv2d)(8, 16, 3, stride=2, gamma=gamma, eps=1e-5)
    ref = (ScaledStdConv2dSame if same else ScaledStdConv2d)(8, 16, 3, stride=2, gamma=gamma, eps=1e-5)
    assert list(ours.state_dict()) == list(ref.state_dict()) == ["weight", "bias", "gain"]
    nn.init.normal_(ours.gain)
    nn.init.normal_(ours.bias)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 8, 15, 15)
    assert torch.equal(ours(x), ref(x))
    with pytest.raises(ValueError, match="scaled style"):
        ScaledWSConv2d(8, 16, 3, style="timm")


def test_gamma_act_constants_preserve_unit_variance():
    from wszoo.layers import NONLIN_GAMMA, GammaAct

    z = torch.randn(2_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for act in ("relu", "silu", "gelu", "tanh", "sigmoid"):
        y = GammaAct(act)(z)
        assert abs(y.square().mean().item() - 1.0) < 0.01 or abs(y.var().item() - 1.0) < 0.01, act
    assert NONLIN_GAMMA["relu"] == 1.7139588594436646 and GammaAct("gelu", gamma=2.0).gamma == 2.0
    with pytest.raises(ValueError, match="unknown activation 'swishy'"):
        GammaAct("swishy")


# --- the eval-mode cache of the standardized weight -------------------------------------------------
def _eval_conv(**kw):
    torch.manual_seed(0)
    return WSConv2d(6, 4, 3, bias=True, **kw).eval()


def _fresh(layer, x):
    """What the layer computes without any cache: the conv with a freshly standardized weight."""
    with torch.no_grad():
        return F.conv2d(x, layer.standardized_weight(), layer.bias, layer.stride, layer.padding, layer.dilation,
                        layer.groups)


def test_eval_cache_is_reused_until_the_weight_changes():
    conv, x = _eval_conv(style="qiao"), torch.randn(1, 6, 5, 5)
    with torch.no_grad():
        first = conv.forward_weight()
        assert conv.forward_weight() is first, "an unchanged weight must not be standardized again"
        conv.weight.mul_(2.0).add_(0.1)  # in-place edit: version counter moves
        assert conv.forward_weight() is not first
        assert torch.equal(conv(x), _fresh(conv, x))


@pytest.mark.parametrize("change", ["optimizer", "load_state_dict", "to_float64", "data_assignment", "eps", "gain"])
def test_eval_cache_is_never_stale(change):
    conv = ScaledWSConv2d(6, 4, 3, gamma=1.3).eval() if change == "gain" else _eval_conv()
    x = torch.randn(1, 6, 5, 5)
    with torch.no_grad():
        before = conv(x).clone()
    if change == "optimizer":
        conv.train()
        opt = torch.optim.SGD(conv.parameters(), lr=0.5)
        conv(x).square().sum().backward()
        opt.step()
        conv.eval()
    elif change == "load_state_dict":
        conv.load_state_dict({k: torch.randn_like(v) for k, v in conv.state_dict().items()})
    elif change == "to_float64":
        conv.double()
        x = x.double()
    elif change == "data_assignment":
        conv.weight.data = torch.randn_like(conv.weight)
    elif change == "eps":
        conv.ws_eps = 10.0
    else:
        with torch.no_grad():
            conv.gain.mul_(3.0)
    with torch.no_grad():
        after = conv(x)
        assert not torch.allclose(after.to(before.dtype), before)
        assert torch.equal(after, _fresh(conv, x))


def test_no_cache_in_train_mode_or_when_grads_reach_the_weight():
    conv, x = _eval_conv(), torch.randn(1, 6, 5, 5)
    with torch.no_grad():
        conv(x)
    assert conv.cached_weight() is not None
    conv.train()
    assert conv.cached_weight() is None, "switching to train must free the cache"
    conv(x)
    assert conv.cached_weight() is None
    conv.eval()
    out = conv(x)  # eval with grad enabled and a trainable weight: gradient must reach it
    assert conv.cached_weight() is None
    out.sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    assert set(conv.state_dict()) == {"weight", "bias"}


def test_inference_mode_cache_is_not_saved_for_backward():
    conv = _eval_conv().requires_grad_(False)
    x = torch.randn(1, 6, 5, 5, requires_grad=True)
    with torch.inference_mode():
        conv(x.detach())
    assert conv.cached_weight().is_inference()
    conv(x).sum().backward()  # frozen layer, grad wanted for the input: must not reuse the inference tensor
    assert x.grad is not None
    assert not conv.cached_weight().is_inference()


def test_cache_is_not_pickled_or_deep_copied():
    import copy
    import pickle

    conv, x = _eval_conv(), torch.randn(1, 6, 5, 5)
    with torch.no_grad():
        conv(x)
    for clone in (copy.deepcopy(conv), pickle.loads(pickle.dumps(conv))):
        assert clone.cached_weight() is None
        with torch.no_grad():
            assert torch.equal(clone(x), conv(x))


def test_cache_is_thread_safe():
    import threading

    torch.manual_seed(0)
    net = nn.Sequential(*[WSConv2d(8, 8, 3, style=s) for s in ("timm", "qiao", "bcn", "timm")]).eval()
    inputs = [torch.randn(1, 8, 6, 6) for _ in range(8)]
    with torch.no_grad():
        expected = [_fresh(net[3], _fresh(net[2], _fresh(net[1], _fresh(net[0], x)))) for x in inputs]
    errors = []

    def worker(k):
        try:
            for _ in range(20):
                with torch.no_grad():
                    for i, x in enumerate(inputs):
                        if not torch.equal(net(x), expected[i]):
                            errors.append((k, i))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


# --- Centered Weight Normalization ---
@pytest.mark.parametrize("learnable_scale", [False, True])
def test_cwn_conv_filters_are_centred_with_equal_norms(learnable_scale):
    torch.manual_seed(11)
    conv = CWNConv2d(6, 12, 3, groups=2, norm=2.5, learnable_scale=learnable_scale).double()
    with torch.no_grad():
        conv.weight.mul_(torch.rand(12, 1, 1, 1, dtype=torch.float64) * 4).add_(0.3)  # uneven scales and means
    flat = conv.standardized_weight().reshape(12, -1)
    torch.testing.assert_close(flat.mean(1), torch.zeros(12, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(flat.norm(dim=1), torch.full((12,), 2.5, dtype=torch.float64), rtol=1e-6, atol=0)
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    gain = conv.gain.detach() if learnable_scale else torch.ones(12, dtype=torch.float64)
    w = ref_cwn(conv.weight.detach(), conv.ws_eps, gain, 1.0 if learnable_scale else 2.5)
    torch.testing.assert_close(conv(x), F.conv2d(x, w, None, padding=1, groups=2), rtol=1e-10, atol=1e-10)


def test_cwn_learnable_scale_is_a_per_filter_norm_and_trains():
    torch.manual_seed(12)
    lin = CWNLinear(10, 4, learnable_scale=True)
    assert set(dict(lin.named_parameters())) == {"weight", "bias", "gain"} and lin.gain.shape == (4, 1)
    with torch.no_grad():
        lin.gain.copy_(torch.tensor([[0.5], [1.0], [2.0], [3.0]]))
    torch.testing.assert_close(lin.standardized_weight().norm(dim=1), torch.tensor([0.5, 1.0, 2.0, 3.0]))
    lin(torch.randn(3, 10)).square().sum().backward()
    assert lin.gain.grad is not None and lin.gain.grad.abs().min() > 0 and lin.weight.grad.abs().max() > 0
    fixed = CWNLinear(10, 4)
    assert fixed.gain is None and set(fixed.state_dict()) == {"weight", "bias"}  # a plain nn.Linear's keys
    assert isinstance(fixed.folded(), nn.Linear) and is_ws_layer(fixed)
    with torch.no_grad():
        x = torch.randn(3, 10)
        torch.testing.assert_close(fixed.folded()(x), fixed(x))


def test_cwn_eval_cache_follows_the_scale_and_bad_norm_is_refused():
    conv = CWNConv2d(4, 6, 3, learnable_scale=True).eval()
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        before = conv(x).clone()
        conv.gain.mul_(2.0)
        torch.testing.assert_close(conv(x), 2 * before)
    with pytest.raises(ValueError, match="norm must be > 0"):
        CWNConv2d(4, 6, 3, norm=0.0)


@pytest.mark.parametrize("size", [(15, 16), (56, 57), (7, 7)])
def test_max_pool_same_matches_timm_and_traces(size):
    """The hybrids' stem pool against timm's MaxPool2dSame (TF 'SAME', -inf padding), odd and even sizes; under
    torch.fx the padding is one leaf call, so the traced pool works at any input size."""
    from timm.layers.pool2d_same import MaxPool2dSame as TimmMaxPool2dSame

    from wszoo.layers import MaxPool2dSame

    x = torch.randn(2, 3, *size) - 5.0  # all negative: a zero padding would show up in the maxima
    ours, ref = MaxPool2dSame(3, 2), TimmMaxPool2dSame(3, 2)
    assert torch.equal(ours(x), ref(x))
    traced = torch.fx.symbolic_trace(ours)
    assert torch.equal(traced(x), ref(x)) and torch.equal(traced(x[..., :-1, :]), ref(x[..., :-1, :]))
