"""SE and ECA against timm's modules (same keys, same outputs) and their definitions."""
import pytest
import torch
from timm.layers import EcaModule as TimmEca
from timm.layers import SEModule as TimmSE

from wszoo.layers import EcaModule, SEModule, create_attn


@pytest.mark.parametrize("channels, kwargs", [(64, dict(rd_ratio=0.5)), (96, dict(rd_ratio=1 / 16)),
                                              (1536, dict(rd_ratio=0.25, rd_divisor=8))])
def test_se_matches_timm(channels, kwargs):
    torch.manual_seed(0)
    ours, ref = SEModule(channels, **kwargs), TimmSE(channels, **kwargs)
    assert list(ours.state_dict()) == list(ref.state_dict())
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, channels, 5, 5)
    assert torch.equal(ours(x), ref(x))


@pytest.mark.parametrize("channels", [16, 256, 1536])
def test_eca_matches_timm_and_kernel_rule(channels):
    torch.manual_seed(1)
    ours, ref = EcaModule(channels), TimmEca(channels)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, channels, 4, 4)
    assert torch.equal(ours(x), ref(x))
    # k = nearest odd to |log2(C) + 1| / 2, at least 3
    assert ours.conv.kernel_size[0] == {16: 3, 256: 5, 1536: 5}[channels]


def test_se_definition():
    torch.manual_seed(2)
    se = SEModule(8, rd_ratio=0.5, rd_divisor=1)
    x = torch.randn(1, 8, 3, 3)
    s = x.mean((2, 3))
    w1, b1 = se.fc1.weight[:, :, 0, 0], se.fc1.bias
    w2, b2 = se.fc2.weight[:, :, 0, 0], se.fc2.bias
    gate = torch.sigmoid(torch.relu(s @ w1.T + b1) @ w2.T + b2)
    torch.testing.assert_close(se(x), x * gate[:, :, None, None])


def test_create_attn():
    assert create_attn(None, 8) is None and isinstance(create_attn("eca", 8), EcaModule)
    with pytest.raises(ValueError, match="unknown attention 'cbam'"):
        create_attn("cbam", 8)
    with pytest.raises(ValueError, match="must be odd"):
        EcaModule(8, kernel_size=4)
