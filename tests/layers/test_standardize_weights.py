"""standardize_weights (many weights at once) against standardize_weight (one at a time): the same numbers
and gradients for every style, layout and dtype; the per-layer function is itself tested against the
papers' formulas and timm in test_standardize.py."""
import pytest
import torch

from wszoo.layers import GAIN_STYLES, WS_STYLES, standardize_weight
from wszoo.layers.grouped import held_by_standardization, standardize_weights

SHAPES = [(8, 4, 3, 3), (16, 4, 3, 3), (6, 36), (6, 5, 1, 1), (4, 5, 1, 1), (5, 2, 3, 3), (3, 3, 3, 3), (7, 1, 3, 3)]


def _mixture(dtype=torch.float64, channels_last=False, seed=0):
    """Every style, several fan-ins (some shared), conv and linear weights, gains on some, gammas != 1."""
    gen = torch.Generator().manual_seed(seed)
    weights, styles, gains, gammas = [], [], [], []
    for k, style in enumerate(WS_STYLES):
        for j, shape in enumerate(SHAPES[k % 3: k % 3 + 4]):
            w = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
            if channels_last and w.dim() == 4:
                w = w.contiguous(memory_format=torch.channels_last)
            weights.append(w.requires_grad_())
            styles.append(style)
            with_gain = style in GAIN_STYLES and j % 2 == 0  # some rows of a gain style have none
            gains.append((0.5 + torch.rand(shape[0], 1, 1, 1, generator=gen, dtype=torch.float64)).to(dtype)
                         .requires_grad_() if with_gain else None)
            gammas.append(1.7 if style in GAIN_STYLES else 1.0)
    return weights, styles, gains, gammas


@pytest.mark.parametrize("channels_last", [False, True])
def test_held_tensors_are_the_results_the_weight_copy_and_the_statistics(channels_last):
    """What a grouped standardization keeps for its backward: the results' buffer, a flat copy of the weights
    and per-row statistics (a few numbers a row), and nothing of tensors it did not make."""
    weights, styles, gains, gammas = _mixture(channels_last=channels_last)
    results = standardize_weights(weights, styles, [None] * len(weights), gains, gammas)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in held_by_standardization(results)}
    weight_bytes = sum(w.numel() * w.element_size() for w in weights)
    row_bytes = sum(w.shape[0] for w in weights) * weights[0].element_size()
    assert 2 * weight_bytes <= sum(storages.values()) <= 2 * weight_bytes + 8 * row_bytes
    assert len({r.untyped_storage().data_ptr() for r in results}) == 1  # views of one buffer
    plain = torch.randn(3, 4)
    assert held_by_standardization([plain]) == [plain]


@pytest.mark.parametrize("channels_last", [False, True])
def test_values_and_gradients_equal_one_weight_at_a_time(channels_last):
    weights, styles, gains, gammas = _mixture(channels_last=channels_last)
    eps = [None] * len(weights)
    reference = [standardize_weight(w, s, None, g, gm)
                 for w, s, g, gm in zip(weights, styles, gains, gammas, strict=True)]
    grouped = standardize_weights(weights, styles, eps, gains, gammas)
    for r, g in zip(reference, grouped, strict=True):
        assert g.shape == r.shape and g.dtype == r.dtype and g.stride() == r.stride()  # layout kept
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)
    cotangents = [torch.randn_like(r) for r in reference]
    params = weights + [g for g in gains if g is not None]
    for a, b in zip(torch.autograd.grad(reference, params, cotangents),
                    torch.autograd.grad(grouped, params, cotangents), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


def test_gradcheck():
    w1 = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(5, 27, dtype=torch.float64, requires_grad=True)
    w3 = torch.randn(3, 2, 1, 1, dtype=torch.float64, requires_grad=True)
    gain = torch.rand(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b, c, g: standardize_weights([a, b, c], ["qiao", "deepmind", "timm"], [1e-3, 1e-3, 1e-3],
                                               [None, g, None], [1.0, 1.3, 1.0]), (w1, w2, w3, gain))


def test_half_precision_weights_use_float32_statistics_and_autocast_is_ignored():
    weights, styles, gains, gammas = _mixture(dtype=torch.float16)
    eps = [None] * len(weights)
    reference = [standardize_weight(w, s, None, g, gm)
                 for w, s, g, gm in zip(weights, styles, gains, gammas, strict=True)]
    grouped = standardize_weights(weights, styles, eps, gains, gammas)
    for r, g in zip(reference, grouped, strict=True):
        assert g.dtype == torch.float16
        torch.testing.assert_close(g, r, rtol=2e-3, atol=2e-3)  # fp16 rounding of fp32 statistics
    weights, styles, gains, gammas = _mixture(dtype=torch.float32)
    outside = standardize_weights(weights, styles, eps, gains, gammas)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = standardize_weights(weights, styles, eps, gains, gammas)
    assert all(i.dtype == torch.float32 and torch.equal(i, o) for i, o in zip(inside, outside, strict=True))


def test_frozen_weights_get_no_gradient_and_build_no_graph():
    trainable = torch.randn(8, 4, 3, 3, requires_grad=True)
    frozen = torch.randn(8, 4, 3, 3)
    a, b = standardize_weights([trainable, frozen], ["qiao", "qiao"], [None, None])
    assert a.requires_grad and not b.requires_grad and b.grad_fn is None
    a.sum().backward()
    assert trainable.grad is not None and frozen.grad is None


@pytest.mark.parametrize("call, message", [
    (lambda w: standardize_weights([w], ["qiao", "timm"], [None]), "one entry per weight"),
    (lambda w: standardize_weights([torch.randn(4, 1, 1, 1)], ["qiao"], [None]), "fan-in of at least 2"),
    (lambda w: standardize_weights([w], ["nope"], [None]), "unknown weight-standardization style"),
    (lambda w: standardize_weights([w], ["qiao"], [0.0]), "eps must be > 0"),
    (lambda w: standardize_weights([w], ["qiao"], [None], [torch.ones(4)]), "gain/gamma apply to"),
    (lambda w: standardize_weights([w], ["deepmind"], [None], [torch.ones(3)]), "one value per output filter"),
])
def test_bad_input_is_a_clear_error(call, message):
    with pytest.raises(ValueError, match=message):
        call(torch.randn(4, 2, 3, 3))
