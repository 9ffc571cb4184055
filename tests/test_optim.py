"""AGC against the NFNet paper's definition, and against timm's implementation."""
import pytest
import torch
import torch.nn as nn
from timm.utils.agc import adaptive_clip_grad as timm_agc

import wszoo
from wszoo.optim import adaptive_clip_grad, agc_parameters, attach_agc, unitwise_norm


def paper_agc(w, g, lam, eps):
    """Per unit i (row of W over all dims but the first): clip when ||G_i|| / max(||W_i||, eps) > lam."""
    out = g.clone()
    rows_w = w.reshape(w.shape[0], -1) if w.dim() > 1 else w.reshape(1, -1)
    rows_g = out.reshape(rows_w.shape)
    for i in range(rows_w.shape[0]):
        wn = max(rows_w[i].norm().item(), eps)
        gn = rows_g[i].norm().item()
        if gn / wn > lam:
            rows_g[i] *= lam * wn / gn
    return out


@pytest.mark.parametrize("shape", [(16, 8, 3, 3), (10, 20), (32,)])
def test_matches_paper_definition(shape):
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(shape, dtype=torch.float64))
    w.grad = torch.randn(shape, dtype=torch.float64) * torch.rand(shape[0], *([1] * (len(shape) - 1)),
                                                                  dtype=torch.float64) * 0.05
    w.data[0].zero_()  # a dead unit: eps decides its limit
    expected = paper_agc(w.detach(), w.grad, 0.01, 1e-3)
    adaptive_clip_grad([w], clip_factor=0.01, eps=1e-3)
    torch.testing.assert_close(w.grad, expected)
    ratio = unitwise_norm(w.grad) / unitwise_norm(w.detach()).clamp_min(1e-3)
    assert (ratio <= 0.01 + 1e-9).all()


def test_equals_timm():
    torch.manual_seed(1)
    a = nn.Parameter(torch.randn(8, 4, 3, 3))
    a.grad = torch.randn_like(a) * 0.1
    b = nn.Parameter(a.detach().clone())
    b.grad = a.grad.clone()
    adaptive_clip_grad(a, 0.02, 1e-3)
    timm_agc(b, 0.02, 1e-3)
    torch.testing.assert_close(a.grad, b.grad)


def test_small_gradients_untouched_and_bad_args():
    w = nn.Parameter(torch.ones(4, 4))
    w.grad = torch.full((4, 4), 1e-4)
    adaptive_clip_grad(w)
    assert torch.equal(w.grad, torch.full((4, 4), 1e-4))
    with pytest.raises(ValueError, match="clip_factor must be > 0"):
        adaptive_clip_grad(w, clip_factor=0)


def test_attach_agc_skips_the_classifier():
    torch.manual_seed(2)
    model = wszoo.create_model("resnet50_gn_ws", num_classes=3)
    params = agc_parameters(model)
    assert all(p is not model.fc.weight and p is not model.fc.bias for p in params)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    handle = attach_agc(opt, model, clip_factor=1e-4)
    (model(torch.randn(2, 3, 32, 32)) * 100).sum().backward()
    fc_grad = model.fc.weight.grad.clone()
    opt.step()
    assert torch.equal(model.fc.weight.grad, fc_grad)
    conv = model.conv1
    ratio = unitwise_norm(conv.weight.grad) / unitwise_norm(conv.weight.detach()).clamp_min(1e-3)
    assert ratio.max() <= 1e-4 * (1 + 1e-5)
    handle.remove()
