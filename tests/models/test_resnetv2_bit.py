"""BiT ResNetV2 against timm's own resnetv2_*_bit models: same keys, same outputs.

`make test` compares outputs on resnetv2_50x1_bit; the deeper and wider ones run in the slow set."""
import pytest
import timm
import torch

import wszoo
from tests.helpers import randomize_, rel_diff

BIT = ["resnetv2_50x1_bit", "resnetv2_50x3_bit", "resnetv2_101x1_bit", "resnetv2_101x3_bit",
       "resnetv2_152x2_bit", "resnetv2_152x4_bit"]
# resnetv2_50x1_bit's blocks, deeper or wider (four of them over 200M parameters)
SLOW = {"resnetv2_101x1_bit", "resnetv2_50x3_bit", "resnetv2_101x3_bit", "resnetv2_152x2_bit", "resnetv2_152x4_bit"}


@pytest.mark.parametrize("name", BIT)
def test_state_dict_key_for_key_timm(name):
    with torch.device("meta"):  # layout only: no memory, no init cost
        ours = wszoo.create_model(name).state_dict()
        ref = timm.create_model(name).state_dict()
    assert list(ours) == list(ref)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in ref.items()}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in BIT])
def test_outputs_match_timm(name):
    ref = randomize_(timm.create_model(name), seed=3).eval()
    ours = wszoo.create_model(name).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = rel_diff(ours(x), ref(x))
        feats_diff = rel_diff(ours.forward_features(x), ref.forward_features(x))
    print(f"{name}: max relative difference vs timm {diff:.2e} (features {feats_diff:.2e})")
    assert diff < 1e-6 and feats_diff < 1e-6


def test_numerics_are_timm_style_eps_1e8():
    model = wszoo.create_model("resnetv2_50x1_bit")
    ws = [m for m in model.modules() if wszoo.layers.is_ws_layer(m)]
    assert len(ws) == 1 + 16 * 3 + 4  # stem + 3 convs per block + one projection per stage
    assert all(m.ws_style == "timm" and m.ws_eps == 1e-8 for m in ws)


def test_drop_path_and_output_stride_match_timm():
    ref = randomize_(timm.create_model("resnetv2_50x1_bit", output_stride=16, drop_path_rate=0.1), seed=4)
    ours = wszoo.create_model("resnetv2_50x1_bit", output_stride=16, drop_path_rate=0.1)
    ours.load_state_dict(ref.state_dict())
    rates = lambda m: [getattr(b.drop_path, "drop_prob", 0.0) for s in m.stages for b in s.blocks]  # noqa: E731
    assert rates(ours) == pytest.approx(rates(ref))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert rel_diff(ours.eval()(x), ref.eval()(x)) < 1e-6
    assert [f["reduction"] for f in ours.feature_info] == [f["reduction"] for f in ref.feature_info]
