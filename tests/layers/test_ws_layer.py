"""WSLayer, the public base of every WS layer: a user's own layer gets the cache, accumulation and folding;
every layer kind scripts (TorchScript) and traces (torch.fx) to eager's numbers, in train and eval."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import wszoo
from wszoo.layers import (
    BatchChannelNorm2d,
    CWNConv2d,
    CWNLinear,
    P4OrientationPool,
    P4WSConv2d,
    ScaledWSConv2d,
    ScaledWSConv2dSame,
    WSConv2d,
    WSConv2dSame,
    WSLayer,
    WSLinear,
    is_ws_layer,
    standardize_weight,
)


class MyWSConv1d(WSLayer, nn.Conv1d):
    """A user's WS layer, written as WSLayer's docstring says."""

    def __init__(self, *args, style="qiao", eps=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.init_ws(style, eps)

    def forward(self, x):
        return self._conv_forward(x, self.forward_weight(), self.bias)

    def folded(self):
        plain = nn.Conv1d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                          self.dilation, self.groups, bias=False, device="meta")
        return self.folded_params_into(plain)


def test_a_users_ws_layer_gets_cache_accumulation_and_folding():
    torch.manual_seed(0)
    net = nn.Sequential(MyWSConv1d(4, 8, 3, padding=1), nn.ReLU(), MyWSConv1d(8, 2, 3, bias=True))
    x = torch.randn(3, 4, 10)
    assert is_ws_layer(net[0]) and wszoo.speed.ws_layers(net)[0][0] == "0"
    expected = F.conv1d(x, standardize_weight(net[0].weight, "qiao"), net[0].bias, padding=1)
    torch.testing.assert_close(net[0](x), expected)
    net.eval()
    with torch.no_grad():
        out = net(x)
        assert net[0].cached_weight() is not None and net[0].forward_weight() is net[0].cached_weight()
    net[0].clear_ws_cache()
    assert net[0].cached_weight() is None
    folded = wszoo.fold_ws(net)
    assert type(folded[0]) is nn.Conv1d
    with torch.no_grad():
        torch.testing.assert_close(folded(x), out)
    net.train()
    per_micro = []
    for accumulate in (False, True):
        net.zero_grad()
        with wszoo.accumulate_ws(net) if accumulate else torch.enable_grad():
            assert net[0].is_accumulating == accumulate
            for i in range(3):
                net(x[i:i + 1]).square().mean().backward()
        per_micro.append([p.grad.clone() for p in net.parameters()])
    for a, b in zip(*per_micro, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    with pytest.raises(RuntimeError, match="already accumulating"):
        net[0].start_accumulation()
        net[0].start_accumulation()
    net[0].stop_accumulation()


LAYERS = {
    "qiao": lambda: WSConv2d(4, 6, 3, style="qiao", bias=True),
    "timm": lambda: WSConv2d(4, 6, 3, stride=2, style="timm", eps=1e-8),
    "bcn": lambda: WSConv2d(4, 6, 3, groups=2, style="bcn"),
    "same": lambda: WSConv2dSame(4, 6, 3, stride=2),
    "scaled": lambda: ScaledWSConv2d(4, 6, 3, gamma=1.7),
    "scaled_same_deepmind": lambda: ScaledWSConv2dSame(4, 6, 3, stride=2, style="deepmind", eps=1e-4),
    "cwn_fixed": lambda: CWNConv2d(4, 6, 3, norm=2.0),
    "cwn_learnable": lambda: CWNConv2d(4, 6, 3, learnable_scale=True),
    "linear": lambda: nn.Sequential(nn.Flatten(), WSLinear(4 * 9 * 9, 5, style="bcn"), CWNLinear(5, 3)),
    "p4": lambda: nn.Sequential(P4WSConv2d(4, 3, 3, lifting=True), P4WSConv2d(3, 3, 3), P4OrientationPool()),
    "bcn_norm": lambda: nn.Sequential(WSConv2d(4, 8, 3), BatchChannelNorm2d(8, 2, estimate=True)),
}


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_every_layer_scripts_and_traces(kind):
    torch.manual_seed(0)
    layer = LAYERS[kind]()
    x = torch.randn(2, 4, 9, 9)
    for train in (True, False):
        eager = copy.deepcopy(layer).train(train)  # BCN moves its estimates in training: fresh copies
        scripted = torch.jit.script(copy.deepcopy(layer).train(train))
        traced = torch.fx.symbolic_trace(copy.deepcopy(layer).train(train))
        with torch.set_grad_enabled(train):
            reference, from_script, from_fx = eager(x), scripted(x), traced(x)
        for other in (from_script, from_fx):
            torch.testing.assert_close(other, reference, rtol=1e-5, atol=1e-6)
        if train:
            names = sorted(n for n, _ in eager.named_parameters())
            grads = torch.autograd.grad(reference.square().sum(), [eager.get_parameter(n) for n in names])
            fx_grads = torch.autograd.grad(from_fx.square().sum(), [traced.get_parameter(n) for n in names])
            for a, b in zip(fx_grads, grads, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_standardize_weight_scripted_equals_eager_for_every_style():
    torch.manual_seed(0)
    scripted = torch.jit.script(standardize_weight)
    weight = torch.randn(6, 4, 3, 3)
    gain = torch.rand(6, 1, 1, 1) + 0.5
    for style, kwargs in [("timm", {}), ("qiao", {}), ("bcn", {}), ("timm_scaled", {"gain": gain, "gamma": 1.7}),
                          ("deepmind", {"gain": gain, "gamma": 1.3}), ("cwn", {"gamma": 2.0})]:
        eps = wszoo.layers.DEFAULT_EPS[style]
        eager = standardize_weight(weight, style, eps, kwargs.get("gain"), kwargs.get("gamma", 1.0))
        torch.testing.assert_close(scripted(weight, style, eps, kwargs.get("gain"), kwargs.get("gamma", 1.0)), eager)
    with pytest.raises(torch.jit.Error, match="needs an explicit eps"):
        scripted(weight, "timm", None, None, 1.0)


@pytest.mark.parametrize("make", [lambda: WSConv2d(4, 8, 3, style="qiao"), lambda: ScaledWSConv2d(4, 8, 3, gamma=1.7),
                                  lambda: CWNLinear(6, 5)], ids=["qiao", "scaled", "cwn"])
def test_a_frozen_layer_in_training_serves_its_cached_weight_and_never_a_stale_one(make):
    """Frozen weights cannot change between steps, so training forwards reuse one standardization of them; any
    change to them (in place, load_state_dict) or unfreezing shows at once."""
    torch.manual_seed(0)
    layer = make().train()
    x = torch.randn(2, *((4, 6, 6) if isinstance(layer, nn.Conv2d) else (6,)), requires_grad=True)
    layer.requires_grad_(False)
    first, second = layer.forward_weight(), layer.forward_weight()
    assert first is second and first.grad_fn is None  # one standardization, reused
    torch.testing.assert_close(first, layer.standardized_weight(), rtol=0, atol=0)
    layer(x).sum().backward()
    assert x.grad is not None  # the input still gets its gradient through the frozen layer
    with torch.no_grad():
        layer.weight.mul_(2.0).add_(0.5)  # changed in place
    torch.testing.assert_close(layer.forward_weight(), layer.standardized_weight(), rtol=0, atol=0)
    assert layer.forward_weight() is not first
    state = {k: torch.randn_like(v) for k, v in layer.state_dict().items()}
    layer.load_state_dict(state)
    torch.testing.assert_close(layer.forward_weight(), layer.standardized_weight(), rtol=0, atol=0)
    layer.weight.requires_grad_(True)  # unfrozen: a fresh, differentiable weight, and the parameter learns
    served = layer.forward_weight()
    assert served.grad_fn is not None
    layer(x).sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
