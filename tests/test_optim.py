"""AGC against the NFNet paper's definition, and against timm's implementation."""
import copy
import functools

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


def _per_parameter_agc(params, clip_factor, eps):
    """The definition, one parameter at a time (timm's loop): float32 norms, the factor in the gradient's dtype."""
    for p in params:
        if p.grad is None:
            continue
        max_norm = unitwise_norm(p.detach().float()).clamp_min(eps) * clip_factor
        grad_norm = unitwise_norm(p.grad.float())
        factor = torch.where(grad_norm > max_norm, max_norm / grad_norm.clamp_min(1e-6), torch.ones_like(grad_norm))
        p.grad.mul_(factor.to(p.grad.dtype))


def _hard_case_grads(model, dtype):
    """Gradients of ``dtype`` on ``model``'s AGC parameters, with the cases a step meets: one parameter without a
    gradient, one all-zero gradient, a weight with a zero row (eps sets its limit), unclipped small gradients."""
    params = agc_parameters(model)
    gen = torch.Generator().manual_seed(0)
    for i, p in enumerate(params):
        scale = 1e-6 if i % 5 == 0 else 0.05  # some units far below their limit: left as they are
        p.grad = (torch.randn(p.shape, generator=gen) * scale).to(dtype)
    params[1].grad = None
    params[2].grad.zero_()
    weights = [p for p in params if p.dim() > 1]
    with torch.no_grad():
        weights[3][0].zero_()
    return params


CASES = [(name, eps, dtype, concatenate) for name, eps in (("nf_regnet_b0", 1e-3), ("nf_regnet_b0", 1e-5))
         for dtype in (torch.float32, torch.float16, torch.bfloat16) for concatenate in (False, True)]
# DeepMind's NFNet (gains, skipinit, 221 parameters of 4 ranks): float32, both layouts
CASES += [("dm_nfnet_f0", 1e-3, torch.float32, False), ("dm_nfnet_f0", 1e-3, torch.float32, True)]


@functools.lru_cache(maxsize=2)
def _model(name):
    torch.manual_seed(0)
    return wszoo.create_model(name, num_classes=5)


@pytest.mark.parametrize("name, eps, dtype, concatenate", CASES,
                         ids=[f"{n}-{e:g}-{str(d)[6:]}-{'cat' if c else 'per-weight'}" for n, e, d, c in CASES])
def test_all_at_once_equals_the_per_parameter_definition(name, eps, dtype, concatenate):
    model = copy.deepcopy(_model(name)).to(dtype)  # (a gradient has its parameter's dtype)
    params = _hard_case_grads(model, dtype)
    before = [None if p.grad is None else p.grad.clone() for p in params]
    adaptive_clip_grad(params, 0.01, eps, concatenate=concatenate)
    ours = [None if p.grad is None else p.grad.clone() for p in params]
    for p, g in zip(params, before, strict=True):
        p.grad = None if g is None else g.clone()
    _per_parameter_agc(params, 0.01, eps)
    assert ours[1] is None and torch.equal(ours[2], torch.zeros_like(ours[2]))
    clipped = 0
    for p, got, g0 in zip(params, ours, before, strict=True):
        if got is None:
            continue
        assert got.dtype == dtype
        torch.testing.assert_close(got, p.grad, rtol=1e-6 if dtype == torch.float32 else 0, atol=0)
        clipped += not torch.equal(got, g0)
    assert clipped > len(params) // 2  # the test clips for real


@pytest.mark.parametrize("name", ["nfnet_f0", "nf_resnet50"])
def test_all_at_once_dispatches_a_few_operators(name):
    """One AGC call (nfnet_f0: 221 parameters): the per-parameter loop dispatched 3,052 operators (nf_resnet50:
    2,212); each is a kernel launch on a GPU."""
    from wszoo.tools.bench import count_dispatches

    model = wszoo.create_model(name, num_classes=5)
    params = _hard_case_grads(model, torch.float32)
    assert count_dispatches(lambda: _per_parameter_agc(params, 0.01, 1e-3)) > 2000
    assert count_dispatches(lambda: adaptive_clip_grad(params, 0.01)) <= 300
    assert count_dispatches(lambda: adaptive_clip_grad(params, 0.01, concatenate=True)) <= 150  # (GPUs)
    # the clip inside the SGD step (--clip-mode agc on the CPU): what it adds to torch's step of the same settings
    from wszoo.optim import SGDWithAGC

    settings = dict(lr=1e-6, momentum=0.9, nesterov=True, weight_decay=1e-5)
    sgd = torch.optim.SGD(model.parameters(), **settings)
    fused = SGDWithAGC(model.parameters(), params, clip_factor=0.01, **settings)
    assert count_dispatches(fused.step) - count_dispatches(sgd.step) <= 300


def _train_grads(model, x):
    model.zero_grad(set_to_none=False)
    model(x).square().mean().backward()


@pytest.mark.parametrize("name", ["nf_resnet26", "resnet18_gn_ws"])
def test_a_training_step_reuses_the_filter_norms_its_standardization_recorded(name):
    """After a training forward, AGC reads each WS weight's filter norms from that forward's statistics
    (no pass over the weights): the per-parameter definition to float32 rounding, in fewer operators; a weight
    changed since (an in-place edit, load_state_dict, an optimizer step) is measured again, never served stale."""
    from wszoo.layers.standardize import recorded_filter_norms
    from wszoo.speed import ws_layers
    from wszoo.tools.bench import count_dispatches

    torch.manual_seed(0)
    model = wszoo.create_model(name, num_classes=5).train()
    params = agc_parameters(model)
    ws_weights = [layer.weight for _, layer in ws_layers(model)]
    x = torch.randn(2, 3, 64, 64)
    _train_grads(model, x)
    assert all(recorded_filter_norms(w, torch.float32) is None for w in ws_weights)  # nobody asked yet
    measured = count_dispatches(lambda: adaptive_clip_grad(params, 1e9))  # (this call asks)
    _train_grads(model, x)
    assert all(recorded_filter_norms(w, torch.float32) is not None for w in ws_weights)
    assert count_dispatches(lambda: adaptive_clip_grad(params, 1e9)) <= measured - len(ws_weights)

    def agc_and_definition():
        grads = [p.grad.clone() for p in params]
        adaptive_clip_grad(params, 1e-9)  # (a factor that clips every unit a gradient reaches)
        ours = [p.grad.clone() for p in params]
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        _per_parameter_agc(params, 1e-9, 1e-3)
        for got, p in zip(ours, params, strict=True):
            torch.testing.assert_close(got, p.grad, rtol=2e-6, atol=0)
        return sum(not torch.equal(got, g) for got, g in zip(ours, grads, strict=True))

    # most parameters a gradient reaches are clipped: the norms decide for real
    assert agc_and_definition() > sum(bool(p.grad.any()) for p in params) // 2
    # changed after the forward: tripled weights, where stale norms would be a third of the true ones
    with torch.no_grad():
        ws_weights[0].mul_(3.0)
    state = model.state_dict()
    key = next(k for k, v in state.items() if v.data_ptr() == ws_weights[1].data_ptr())
    model.load_state_dict({**state, key: state[key] * 3.0})
    assert recorded_filter_norms(ws_weights[0], torch.float32) is None
    assert recorded_filter_norms(ws_weights[1], torch.float32) is None
    agc_and_definition()
    torch.optim.SGD(model.parameters(), lr=0.1).step()  # every weight moves: every record is stale
    assert all(recorded_filter_norms(w, torch.float32) is None for w in ws_weights)
    agc_and_definition()


def _sgd_groups(model):
    """finetune's layout: decay on the weights, none on vectors (biases, norms, gains)."""
    return [{"params": [p for p in model.parameters() if p.dim() > 1], "weight_decay": 1e-3},
            {"params": [p for p in model.parameters() if p.dim() <= 1], "weight_decay": 0.0}]


@pytest.mark.parametrize("momentum, dampening, nesterov", [(0.0, 0.0, False), (0.9, 0.0, False), (0.9, 0.0, True),
                                                          (0.9, 0.1, False)])
def test_sgd_with_agc_is_the_clip_then_torch_sgd(momentum, dampening, nesterov):
    """SGDWithAGC (the clip inside SGD's pass) against adaptive_clip_grad followed by torch.optim.SGD, over
    three steps with the same gradients: float32 rounding apart the same weights; the classifier (not clipped)
    bit for bit torch's; the state loads into torch.optim.SGD (a run can resume with either)."""
    from wszoo.optim import SGDWithAGC

    torch.manual_seed(0)
    ours_model = wszoo.create_model("nf_regnet_b0", num_classes=5)
    ref_model = copy.deepcopy(ours_model)
    plain_model = copy.deepcopy(ours_model)
    settings = dict(lr=0.05, momentum=momentum, dampening=dampening, nesterov=nesterov)
    ours = SGDWithAGC(_sgd_groups(ours_model), agc_parameters(ours_model), clip_factor=0.01, **settings)
    ref = torch.optim.SGD(_sgd_groups(ref_model), **settings)
    plain = torch.optim.SGD(_sgd_groups(plain_model), **settings)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=gen) * 0.05 for p in ours_model.parameters()]
        for model in (ours_model, ref_model, plain_model):
            for p, g in zip(model.parameters(), grads, strict=True):
                p.grad = g.clone()
        ours.step()
        adaptive_clip_grad(agc_parameters(ref_model), 0.01)
        ref.step()
        plain.step()
    classifier = {id(p) for p in ours_model.get_classifier().parameters()}
    assert len(classifier) == 2
    for (name, a), b in zip(ours_model.named_parameters(), ref_model.parameters(), strict=True):
        if id(a) in classifier:
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)
    moved = [not torch.allclose(a, c) for a, c in zip(ours_model.parameters(), plain_model.parameters(), strict=True)]
    assert sum(moved) > len(moved) // 2  # the clip changed most steps: the comparison is not vacuous
    resumed = torch.optim.SGD(_sgd_groups(plain_model), **settings)
    resumed.load_state_dict(ours.state_dict())
    if momentum:
        assert all("momentum_buffer" in s for s in resumed.state.values())


def test_sgd_with_agc_refuses_what_it_does_not_do():
    from wszoo.optim import SGDWithAGC

    w = nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match="clip_factor and eps must be > 0"):
        SGDWithAGC([w], [w], lr=0.1, clip_factor=0.0)
    opt = SGDWithAGC([w], [w], lr=0.1)
    opt.param_groups[0]["maximize"] = True
    w.grad = torch.ones(4, 4)
    with pytest.raises(ValueError, match="does not maximize"):
        opt.step()
