"""Batch-Channel Normalization against a transcription of the reference code (BN, then a
batch_norm over (1, N * G, -1), then the per-group affine), in train and eval, at batch 1."""
import pytest
import torch
import torch.nn as nn

import wszoo
from wszoo.layers import BatchChannelNorm2d, EstimatedBatchNorm2d


def reference_bcn(x, bn_out, groups, weight, bias, eps):
    n = x.shape[0]
    out = torch.batch_norm(bn_out.reshape(1, n * groups, -1), None, None, None, None, True, 0.0, eps, True)
    return (weight * out.reshape(n, groups, -1) + bias).reshape_as(x)


def _randomize(norm):
    with torch.no_grad():
        for p in norm.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + 1.0)
    return norm


@pytest.mark.parametrize("estimate", [False, True])
def test_train_and_eval_match_the_reference(estimate):
    torch.manual_seed(0)
    norm = _randomize(BatchChannelNorm2d(12, num_groups=4, estimate=estimate).double())
    x = torch.randn(3, 12, 5, 5, dtype=torch.float64) * 2 + 1
    for mode in ("train", "eval"):
        norm.train(mode == "train")
        out = norm(x)
        # the batch step: batch statistics in training, else the estimates (in training, after this
        # batch moved them: the reference code updates first, then normalizes)
        bn_ref = nn.BatchNorm2d(12).double().train(mode == "train" and not estimate)
        bn_ref.load_state_dict(norm.bn.state_dict())
        expected = reference_bcn(x, bn_ref(x), 4, norm.weight, norm.bias, norm.eps)
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_eval_works_at_batch_one_and_does_not_touch_the_estimates():
    torch.manual_seed(1)
    norm = BatchChannelNorm2d(8, num_groups=2)
    for _ in range(3):
        norm(torch.randn(4, 8, 6, 6) * 3 + 2)
    assert norm.bn.num_batches_tracked == 3 and not torch.allclose(norm.bn.running_mean, torch.zeros(8))
    norm.eval()
    state = {k: v.clone() for k, v in norm.state_dict().items()}
    single = torch.randn(1, 8, 6, 6)
    out = norm(single)
    assert out.shape == single.shape and torch.isfinite(out).all()
    # eval is per image: the same image in a batch of 4 gives the same output
    torch.testing.assert_close(norm(torch.cat([single, torch.randn(3, 8, 6, 6)]))[:1], out)
    assert all(torch.equal(v, norm.state_dict()[k]) for k, v in state.items())


def test_estimated_batch_norm_normalizes_with_estimates_and_moves_them():
    torch.manual_seed(2)
    bn = EstimatedBatchNorm2d(4, momentum=0.25).double()
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.5, -1.0, 0.0, 2.0]))
        bn.running_var.copy_(torch.tensor([1.0, 4.0, 0.25, 2.0]))
    mean0, var0 = bn.running_mean.clone(), bn.running_var.clone()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64) * 1.5 + 0.7
    out = bn(x)
    per_channel = x.transpose(0, 1).reshape(4, -1)
    # the estimates move first (the variance about the old running mean), then normalize the batch
    mean1 = 0.75 * mean0 + 0.25 * per_channel.mean(1)
    var1 = 0.75 * var0 + 0.25 * ((per_channel - mean0[:, None]) ** 2).mean(1)
    torch.testing.assert_close(bn.running_mean, mean1)
    torch.testing.assert_close(bn.running_var, var1)
    expected = (x - mean1.view(1, -1, 1, 1)) / torch.sqrt(var1.view(1, -1, 1, 1) + 1e-5)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    # a micro-batch normalizes each image independently of the others
    bn.eval()
    one = bn(x[:1])
    torch.testing.assert_close(bn(x)[:1], one)
    out.sum().backward()  # gradients reach the affine, not the estimates
    assert bn.weight.grad is not None and bn.running_mean.grad is None


def test_keys_follow_the_reference_code():
    keys = set(BatchChannelNorm2d(8, 2, estimate=True).state_dict())
    assert keys == {"weight", "bias", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var",
                    "bn.num_batches_tracked"}
    assert BatchChannelNorm2d(8, 2).weight.shape == (1, 2, 1)


def test_bad_arguments_and_inputs():
    with pytest.raises(ValueError, match=r"num_groups \(3\) must divide num_channels \(8\)"):
        BatchChannelNorm2d(8, 3)
    with pytest.raises(ValueError, match="momentum must be in"):
        EstimatedBatchNorm2d(8, momentum=2.0)
    with pytest.raises(ValueError, match=r"takes \(N, 8, H, W\)"):
        BatchChannelNorm2d(8, 2)(torch.randn(2, 6, 4, 4))


def test_bcn_ws_mini_resnet_trains_at_batch_one_and_evaluates():
    torch.manual_seed(3)
    model = wszoo.create_model("resnet_mini_bcn_ws", widths=(8, 16, 16))
    assert any(isinstance(m, BatchChannelNorm2d) for m in model.modules())
    assert {m.ws_style for m in model.modules() if wszoo.layers.is_ws_layer(m)} == {"bcn"}
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(1, 1, 28, 28), torch.tensor([3])
    losses = []
    for _ in range(5):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    assert model(x).shape == (1, 10)
