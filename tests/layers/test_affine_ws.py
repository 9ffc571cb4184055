"""convert_to_ws(preserve_function=True), mmcv's ConvAWS: a BatchNorm-trained network (random running
statistics, eval mode) computes the same outputs after the conversion, then trains in WS form."""
import pytest
import timm
import torch
import torchvision

import wszoo
from wszoo.layers import AffineWSConv2d, convert_to_ws


def _random_bn_statistics(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
    return model.eval()


@pytest.mark.parametrize("make", [lambda: torchvision.models.resnet18(num_classes=10),
                                  lambda: timm.create_model("resnet26", num_classes=10)],
                         ids=["torchvision_resnet18", "timm_resnet26"])
@pytest.mark.parametrize("style", ["qiao", "timm", "deepmind"])
def test_outputs_are_preserved_and_the_model_trains(make, style):
    torch.manual_seed(0)
    model = _random_bn_statistics(make())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
    keys = set(model.state_dict())
    report = convert_to_ws(model, style=style, preserve_function=True)
    converted = list(report.converted)
    assert converted and all(isinstance(model.get_submodule(n), AffineWSConv2d) for n in converted)
    assert set(model.state_dict()) == keys | {f"{n}.{p}" for n in converted for p in ("weight_gamma", "weight_beta")}
    with torch.no_grad():
        after = model(x)
        torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5 * before.abs().max().item())
        torch.testing.assert_close(wszoo.fold_ws(model)(x), before, rtol=1e-5, atol=1e-5 * before.abs().max().item())
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    target = torch.tensor([1, 2])
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), target)
        loss.backward()
        losses.append(loss.item())
        optimizer.step()
    layer = model.get_submodule(converted[1])
    assert layer.weight_gamma.grad is not None and layer.weight.grad is not None
    assert losses[-1] < losses[0]


def test_group_norm_cannot_preserve_the_function():
    model = torchvision.models.resnet18()
    with pytest.raises(ValueError, match="norm='gn' changes it"):
        convert_to_ws(model, norm="gn", preserve_function=True)
    assert type(model.conv1) is torch.nn.Conv2d  # nothing half-applied
