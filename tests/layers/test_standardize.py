"""standardize_weight against direct transcriptions of each upstream formula, and WS's properties."""
import pytest
import torch

from wszoo.layers import DEFAULT_EPS, WS_STYLES, standardize_weight


# --- direct transcriptions of the upstream code (float64, written as the papers/repos write them) ---
def ref_timm(w, eps):  # timm StdConv2d: batch_norm over (1, out, fan_in): biased var, eps inside sqrt
    flat = w.reshape(w.shape[0], -1)
    mean = flat.mean(1, keepdim=True)
    var = ((flat - mean) ** 2).mean(1, keepdim=True)
    return ((flat - mean) / torch.sqrt(var + eps)).reshape(w.shape)


def ref_qiao(w, eps):  # Qiao et al.'s Conv2d.forward: mean over dims 1..3, unbiased std + eps outside
    mean = w.mean(dim=1, keepdim=True).mean(dim=2, keepdim=True).mean(dim=3, keepdim=True)
    w = w - mean
    std = w.view(w.size(0), -1).std(dim=1).view(-1, 1, 1, 1) + eps
    return w / std.expand_as(w)


def ref_bcn(w, eps):  # BCN repo: unbiased var, eps inside sqrt
    flat = w.reshape(w.shape[0], -1)
    mean = flat.mean(1, keepdim=True)
    var = ((flat - mean) ** 2).sum(1, keepdim=True) / (flat.shape[1] - 1)
    return ((flat - mean) / torch.sqrt(var + eps)).reshape(w.shape)


def ref_timm_scaled(w, eps, gain, gamma):  # timm ScaledStdConv2d: gain * gamma / sqrt(fan_in) * timm-WS
    fan_in = w[0].numel()
    return gain.reshape(-1, *([1] * (w.dim() - 1))) * gamma * fan_in ** -0.5 * ref_timm(w, eps)


def ref_deepmind(w, eps, gain, gamma):  # DeepMind WSConv2D (HWIO there; OIHW here): W*s - mean*s
    flat = w.reshape(w.shape[0], -1)
    mean = flat.mean(1, keepdim=True)
    var = flat.var(1, correction=0, keepdim=True)
    scale = torch.rsqrt(torch.maximum(var * flat.shape[1], torch.tensor(eps, dtype=w.dtype))) * gain.reshape(-1, 1)
    return (gamma * (flat * scale - mean * scale)).reshape(w.shape)


def ref_cwn(w, eps, gain, gamma):  # Centered WN (Huang et al. 2017): g * (v - mean(v)) / ||v - mean(v)||
    flat = w.reshape(w.shape[0], -1)
    centred = flat - flat.mean(1, keepdim=True)
    norm = torch.sqrt((centred ** 2).sum(1, keepdim=True) + eps)
    return (gamma * gain.reshape(-1, 1) * centred / norm).reshape(w.shape)


REFERENCES = {"timm": ref_timm, "qiao": ref_qiao, "bcn": ref_bcn}
SCALED_REFERENCES = {"timm_scaled": ref_timm_scaled, "deepmind": ref_deepmind, "cwn": ref_cwn}
UNSCALED = tuple(REFERENCES)


def test_every_style_has_a_reference_and_a_default_eps():
    assert set(WS_STYLES) == set(REFERENCES) | set(SCALED_REFERENCES) == set(DEFAULT_EPS)
    assert DEFAULT_EPS == {"timm": 1e-6, "qiao": 1e-5, "bcn": 1e-5, "timm_scaled": 1e-5, "deepmind": 1e-4, "cwn": 1e-8}


@pytest.mark.parametrize("style", UNSCALED)
@pytest.mark.parametrize("shape", [(16, 8, 3, 3), (7, 1, 5, 5), (32, 64, 1, 1)])
def test_matches_upstream_formula(style, shape):
    torch.manual_seed(0)
    # small weights make eps matter, so a misplaced eps would show
    w = torch.randn(shape, dtype=torch.float64) * 3e-3 + 1e-3
    eps = DEFAULT_EPS[style]
    got = standardize_weight(w, style)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, REFERENCES[style](w, eps), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("style", UNSCALED)
def test_float32_close_to_float64_reference(style):
    torch.manual_seed(1)
    w = torch.randn(24, 12, 3, 3)
    ref = REFERENCES[style](w.double(), DEFAULT_EPS[style]).float()
    torch.testing.assert_close(standardize_weight(w, style), ref, rtol=1e-5, atol=1e-5)


def test_eps_placement_distinguishes_styles():
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64) * 1e-3
    outs = {s: standardize_weight(w, s, eps=1e-5) for s in UNSCALED}
    assert not torch.allclose(outs["timm"], outs["qiao"])
    assert not torch.allclose(outs["qiao"], outs["bcn"])


@pytest.mark.parametrize("style", UNSCALED)
def test_zero_mean_unit_variance_per_filter(style):
    torch.manual_seed(2)
    w = torch.randn(32, 16, 3, 3, dtype=torch.float64) * 0.5 + 0.3
    flat = standardize_weight(w, style, eps=1e-12).reshape(32, -1)
    torch.testing.assert_close(flat.mean(1), torch.zeros(32, dtype=torch.float64), atol=1e-12, rtol=0)
    # timm normalizes the biased variance to 1; the unbiased styles the unbiased one
    correction = 0 if style == "timm" else 1
    torch.testing.assert_close(flat.var(1, correction=correction), torch.ones(32, dtype=torch.float64))
    n = flat.shape[1]
    biased = flat.var(1, correction=0)
    expected_biased = torch.full_like(biased, 1.0 if style == "timm" else (n - 1) / n)
    torch.testing.assert_close(biased, expected_biased)


@pytest.mark.parametrize("style", WS_STYLES)
def test_invariant_to_per_filter_affine(style):
    torch.manual_seed(3)
    w = torch.randn(8, 4, 3, 3, dtype=torch.float64)
    a = torch.rand(8, 1, 1, 1, dtype=torch.float64) * 5 + 0.1
    b = torch.randn(8, 1, 1, 1, dtype=torch.float64) * 10
    torch.testing.assert_close(
        standardize_weight(a * w + b, style, eps=1e-14), standardize_weight(w, style, eps=1e-14)
    )


@pytest.mark.parametrize("style", WS_STYLES)
def test_gradient_flows_and_is_orthogonal_to_filter_mean(style):
    torch.manual_seed(4)
    w = torch.randn(6, 5, 3, 3, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(6, 5, 3, 3, dtype=torch.float64)
    (standardize_weight(w, style, eps=1e-10) * upstream).sum().backward()
    grad = w.grad.reshape(6, -1)
    assert grad.abs().max() > 1e-3
    # adding a constant to a filter does not change the output, so the gradient has no such component
    torch.testing.assert_close(grad.sum(1), torch.zeros(6, dtype=torch.float64), atol=1e-10, rtol=0)
    # and (up to eps) scaling a filter does not either
    torch.testing.assert_close((grad * w.detach().reshape(6, -1)).sum(1), torch.zeros(6, dtype=torch.float64),
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize("style", WS_STYLES)
def test_constant_filters_stay_finite(style):
    w = torch.ones(4, 3, 3, 3, requires_grad=True)
    out = standardize_weight(w, style)
    assert torch.isfinite(out).all() and out.abs().max() == 0
    out.sum().backward()
    assert torch.isfinite(w.grad).all()
    z = torch.zeros(4, 3, 3, 3, requires_grad=True)
    (standardize_weight(z, style) * torch.randn(4, 3, 3, 3)).sum().backward()
    assert torch.isfinite(z.grad).all()


def test_linear_weights_standardize_over_in_features():
    w = torch.randn(10, 20, dtype=torch.float64)
    torch.testing.assert_close(standardize_weight(w, "timm", 1e-6), ref_timm(w, 1e-6))


def test_half_precision_weights_are_standardized_in_float32():
    torch.manual_seed(5)
    w = torch.randn(16, 8, 3, 3).half()
    got = standardize_weight(w, "qiao")
    assert got.dtype == torch.float16
    torch.testing.assert_close(got, ref_qiao(w.double(), 1e-5).half(), rtol=1e-3, atol=1e-3)
    assert torch.equal(got, standardize_weight(w.float(), "qiao").half())


def test_autocast_does_not_lower_the_statistics_precision():
    torch.manual_seed(6)
    w = torch.randn(16, 8, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = standardize_weight(w, "timm")
    assert got.dtype == torch.float32
    assert torch.equal(got, standardize_weight(w, "timm"))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(style="nope"), "unknown weight-standardization style 'nope'"),
        (dict(style="timm", eps=0.0), "eps must be > 0"),
        (dict(style="timm", eps=-1.0), "eps must be > 0"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        standardize_weight(torch.randn(4, 3, 3, 3), **kwargs)


def test_bad_shapes():
    with pytest.raises(ValueError, match="fan-in"):
        standardize_weight(torch.randn(5))
    for style in WS_STYLES:
        with pytest.raises(ValueError, match="fan-in 1"):
            standardize_weight(torch.randn(5, 1, 1, 1), style)


@pytest.mark.parametrize("style", sorted(SCALED_REFERENCES))
@pytest.mark.parametrize("with_gain", [False, True])
def test_scaled_styles_match_upstream_formula(style, with_gain):
    torch.manual_seed(7)
    w = torch.randn(16, 8, 3, 3, dtype=torch.float64) * 0.05
    gain = torch.rand(16, 1, 1, 1, dtype=torch.float64) + 0.5 if with_gain else None
    gamma = 1.7139588594436646  # relu's
    got = standardize_weight(w, style, gain=gain, gamma=gamma)
    ref_gain = gain if with_gain else torch.ones(16, dtype=torch.float64)
    torch.testing.assert_close(got, SCALED_REFERENCES[style](w, DEFAULT_EPS[style], ref_gain, gamma),
                               rtol=1e-10, atol=1e-12)


def test_scaled_styles_give_unit_fan_in_variance_and_agree_with_each_other():
    torch.manual_seed(8)
    w = torch.randn(32, 16, 3, 3, dtype=torch.float64)
    for style in SCALED_REFERENCES:
        flat = standardize_weight(w, style, eps=1e-12).reshape(32, -1)
        # Scaled WS: zero mean, variance 1/fan_in, so a unit-variance input keeps unit variance (for CWN
        # the same statement reads: centred filters of unit norm)
        torch.testing.assert_close(flat.var(1, correction=0) * flat.shape[1], torch.ones(32, dtype=torch.float64))
    torch.testing.assert_close(standardize_weight(w, "timm_scaled", eps=1e-14),
                               standardize_weight(w, "deepmind", eps=1e-14))
    torch.testing.assert_close(standardize_weight(w, "cwn", eps=1e-14), standardize_weight(w, "deepmind", eps=1e-14))


def test_timm_scaled_is_bitwise_timm():
    from timm.layers import ScaledStdConv2d

    torch.manual_seed(9)
    conv = ScaledStdConv2d(8, 16, 3, gamma=1.7881293296813965, eps=1e-5)
    torch.nn.init.normal_(conv.gain)
    ref = torch.nn.functional.batch_norm(
        conv.weight.reshape(1, 16, -1), None, None, weight=(conv.gain * conv.scale).view(-1),
        training=True, momentum=0.0, eps=1e-5).reshape_as(conv.weight)
    assert torch.equal(standardize_weight(conv.weight, "timm_scaled", 1e-5, conv.gain, 1.7881293296813965), ref)


def test_gain_and_gamma_only_for_scaled_styles():
    w = torch.randn(4, 3, 3, 3)
    with pytest.raises(ValueError, match="gain/gamma apply to the styles"):
        standardize_weight(w, "timm", gamma=2.0)
    with pytest.raises(ValueError, match="gain/gamma apply to the styles"):
        standardize_weight(w, "qiao", gain=torch.ones(4))
    with pytest.raises(ValueError, match=r"one value per output filter \(4\)"):
        standardize_weight(w, "deepmind", gain=torch.ones(5))


# --- gradients (qiao runs on a custom autograd function; the others on batch_norm's own backward) ---
@pytest.mark.parametrize("style", UNSCALED)
@pytest.mark.parametrize("eps", [1e-5, 3e-2])
@pytest.mark.parametrize("shape", [(16, 8, 3, 3), (5, 40)])
def test_gradient_equals_autograd_through_the_upstream_formula(style, eps, shape):
    """qiao/bcn run on a custom autograd function whose backward is one batch_norm backward with a
    per-row invstd rho = sqrt(-2 b'(v) / b) and affine weight a / rho (see _Standardize). For qiao,
    y = (W - m) * a with a = 1 / (s_u + eps), s_u the unbiased std over n, the true gradient is
    dL/dW = a (g - mean(g)) - (W - m) * a^2 * sum(g (W - m)) / ((n - 1) s_u); a large eps makes the
    difference from batch_norm's own backward large, so a wrong rho would show."""
    torch.manual_seed(5)
    w = (torch.randn(*shape, dtype=torch.float64) * 0.05 + 0.02).requires_grad_()
    w_ref = w.detach().clone().requires_grad_()
    upstream = torch.randn(*shape, dtype=torch.float64)
    (standardize_weight(w, style, eps) * upstream).sum().backward()
    (REFERENCES[style](w_ref.reshape(shape[0], -1, 1, 1) if len(shape) == 2 else w_ref, eps).reshape(shape)
     * upstream).sum().backward()
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-9, atol=1e-9)


def test_qiao_passes_gradcheck_and_refuses_double_backward():
    w = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: standardize_weight(t, "qiao", 1e-2), (w,))
    (grad,) = torch.autograd.grad(standardize_weight(w, "qiao").pow(3).sum(), w, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|double backward|twice"):
        grad.sum().backward()


@pytest.mark.parametrize("style", WS_STYLES)
def test_channels_last_weights_keep_their_layout_and_values(style):
    torch.manual_seed(6)
    w = torch.randn(8, 5, 3, 3)
    w_cl = w.to(memory_format=torch.channels_last).requires_grad_()
    out = standardize_weight(w_cl, style)
    assert out.is_contiguous(memory_format=torch.channels_last), "no layout change: the conv wants channels-last"
    torch.testing.assert_close(out, standardize_weight(w, style), rtol=1e-6, atol=1e-6)
    out.sum().backward()
    assert w_cl.grad is not None and torch.isfinite(w_cl.grad).all()


@pytest.mark.parametrize("style", SCALED_REFERENCES)
def test_scaled_gradients_reach_weight_and_gain_as_autograd_through_the_formula(style):
    torch.manual_seed(7)
    shape = (6, 4, 3, 3)
    w = (torch.randn(*shape, dtype=torch.float64) * 0.05).requires_grad_()
    gain = (torch.rand(6, 1, 1, 1, dtype=torch.float64) + 0.5).requires_grad_()
    w_ref, gain_ref = w.detach().clone().requires_grad_(), gain.detach().clone().requires_grad_()
    upstream = torch.randn(*shape, dtype=torch.float64)
    eps = 1e-2  # large enough for deepmind's clamp to bite on none of the rows but to shape the result
    (standardize_weight(w, style, eps, gain=gain, gamma=1.3) * upstream).sum().backward()
    (SCALED_REFERENCES[style](w_ref, eps, gain_ref, 1.3) * upstream).sum().backward()
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(gain.grad, gain_ref.grad, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("style", WS_STYLES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_filter_norms_come_from_the_standardization_statistics(style, dtype):
    """standardize_weight_and_norms: the standardized weight bit for bit as standardize_weight gives it (the
    timm styles through batch_norm's kernel that also returns the statistics), and each filter's L2 norm of the
    raw weight from n (var + mean^2), to float rounding, zero filters included."""
    from wszoo.layers.standardize import GAIN_STYLES, standardize_weight_and_norms

    torch.manual_seed(0)
    w = (torch.randn(24, 8, 3, 3) * 0.05 + 0.01).to(dtype).contiguous(memory_format=torch.channels_last)
    w[3].zero_()
    gain = torch.rand(24) + 0.5 if style in GAIN_STYLES else None
    out, norms = standardize_weight_and_norms(w, style, gain=gain)
    assert torch.equal(out, standardize_weight(w, style, gain=gain)) and out.dtype == dtype
    stats_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    expected = torch.linalg.vector_norm(w.to(stats_dtype), dim=(1, 2, 3), keepdim=True)
    assert norms.shape == (24, 1, 1, 1) and norms.dtype == stats_dtype
    # batch_norm returns 1/sqrt(var + eps): var = invstd^-2 - eps keeps the rounding of var + eps, so a zero
    # filter's norm is ~sqrt(n eps 2^-23) there (float32), where the fused styles give 0 exactly
    from wszoo.layers.standardize import BATCH_NORM_STYLES
    rounding = 2.0 ** -52 if stats_dtype == torch.float64 else 2.0 ** -23
    atol = (72 * DEFAULT_EPS[style] * rounding * 4) ** 0.5 if style in BATCH_NORM_STYLES else 0.0
    torch.testing.assert_close(norms, expected, rtol=1e-12 if dtype == torch.float64 else 2e-6, atol=atol)
    assert norms[3].item() <= atol
