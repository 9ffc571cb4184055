"""NF family against timm's nfnet.py: same keys for every architecture, same outputs on random weights.

`make test` compares outputs for one published architecture per block layout (dm_nfnet_f0, nfnet_l0,
eca_nfnet_l0, nf_resnet50, nf_regnet_b1); eca_nfnet_l1 and eca_nfnet_l2 (eca_nfnet_l0's blocks, deeper) and
the F1-F6 run in the slow set."""
import pytest
import timm
import torch

import wszoo
from tests.helpers import randomize_, rel_diff
from wszoo.layers import GammaAct, ScaledWSConv2d, ScaledWSConv2dSame
from wszoo.models.nfnet import MODEL_CFGS, NormFreeBlock

NF = wszoo.list_models(["*nfnet*", "nf_*"])
PUBLISHED = sorted({n.split(".")[0] for n in wszoo.list_pretrained() if n.split(".")[0] in NF})
SMALL_PUBLISHED = {"dm_nfnet_f0", "nfnet_l0", "eca_nfnet_l0", "eca_nfnet_l1", "eca_nfnet_l2", "nf_resnet50",
                   "nf_regnet_b1"}
DEFAULT_RUN = SMALL_PUBLISHED - {"eca_nfnet_l1", "eca_nfnet_l2"}  # the rest: `make test-slow`


def test_every_nf_architecture_registered():
    expected = ({f"dm_nfnet_f{i}" for i in range(7)} | {f"nfnet_f{i}" for i in range(8)} | {"nfnet_l0"}
                | {f"eca_nfnet_l{i}" for i in range(4)} | {f"nf_regnet_b{i}" for i in range(6)}
                | {f"nf_{k}resnet{d}" for k in ("", "se", "eca") for d in (26, 50, 101)})
    assert set(NF) == expected == set(MODEL_CFGS)
    assert set(PUBLISHED) == {f"dm_nfnet_f{i}" for i in range(7)} | SMALL_PUBLISHED


@pytest.mark.parametrize("name", NF)
def test_state_dict_key_for_key_timm(name):
    with torch.device("meta"):
        ours = wszoo.create_model(name).state_dict()
        ref = timm.create_model(name).state_dict()
    assert list(ours) == list(ref)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in ref.items()}


@pytest.mark.parametrize("name", [n if n in DEFAULT_RUN else pytest.param(n, marks=pytest.mark.slow)
                                  for n in PUBLISHED])
def test_outputs_match_timm_with_random_gains(name):
    ref = randomize_(timm.create_model(name), seed=5).eval()
    assert all(p.abs().min() >= 0.5 for k, p in ref.named_parameters() if k.endswith("gain"))
    ours = wszoo.create_model(name).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out, expected = ours(x), ref(x)
    diff = rel_diff(out, expected)
    print(f"{name}: max relative difference vs timm {diff:.2e}")
    assert diff < 1e-5


def test_unpublished_variant_matches_timm():
    """One SE and one ECA NF-ResNet too: the attention wiring of the ResNet-style block."""
    for name in ("nf_seresnet26", "nf_ecaresnet26"):
        ref = randomize_(timm.create_model(name), seed=6).eval()
        ours = wszoo.create_model(name).eval()
        ours.load_state_dict(ref.state_dict())
        x = torch.randn(1, 3, 64, 64)
        with torch.no_grad():
            assert rel_diff(ours(x), ref(x)) < 1e-5, name


def test_alpha_beta_schedule_follows_the_paper():
    """beta_l = 1/sqrt(Var(h_l)), Var growing by alpha^2 per block and reset to 1 after each transition."""
    model = wszoo.create_model("nf_resnet50")
    alpha = 0.2
    for stage in model.stages:
        for j, block in enumerate(stage):
            assert block.alpha == alpha
            if j == 0:
                assert block.downsample is not None
            else:
                assert block.downsample is None
                assert block.beta == pytest.approx((1 + j * alpha ** 2) ** -0.5)
    assert model.stages[0][0].beta == 1.0  # the stem output has unit variance by construction


def test_deepmind_models_use_same_padding_gamma_in_act_and_skipinit():
    dm = wszoo.create_model("dm_nfnet_f0")
    convs = [m for m in dm.modules() if isinstance(m, ScaledWSConv2d)]
    assert convs and all(isinstance(m, ScaledWSConv2dSame) and m.gamma == 1.0 for m in convs)
    act1 = dm.stages[0][0].act1
    assert isinstance(act1, GammaAct) and act1.gamma == pytest.approx(1.7015043497085571)
    blocks = [m for m in dm.modules() if isinstance(m, NormFreeBlock)]
    assert all(b.skipinit_gain is not None and b.skipinit_gain.item() == 0 for b in blocks)
    timm_style = wszoo.create_model("nfnet_f0")
    convs = [m for m in timm_style.modules() if isinstance(m, ScaledWSConv2d)]
    assert all(type(m) is ScaledWSConv2d and m.gamma == pytest.approx(1.7015043497085571) for m in convs)
    assert all(b.conv3.gain.abs().sum() == 0 for b in timm_style.modules() if isinstance(b, NormFreeBlock))


def test_config_overrides_and_errors():
    model = wszoo.create_model("nf_resnet26", act_layer="silu", ws_eps=1e-4)
    assert model.cfg.act_layer == "silu" and model.stem.conv.ws_eps == 1e-4
    # every family takes ws_eps; timm's name for it is read the same (older saved configs carry it)
    timm_named = wszoo.create_model("nf_regnet_b0", std_conv_eps=1e-3)
    assert {m.ws_eps for m in timm_named.modules() if hasattr(m, "ws_eps")} == {1e-3}
    with pytest.raises(ValueError, match="not both"):
        wszoo.create_model("nf_regnet_b0", ws_eps=1e-3, std_conv_eps=1e-3)
    with pytest.raises(ValueError, match="no gamma constant for activation 'mish'"):
        wszoo.create_model("nf_resnet26", act_layer="mish")
    with pytest.raises(TypeError):
        wszoo.create_model("nf_resnet26", not_a_field=1)


def test_output_stride_matches_timm():
    ref = randomize_(timm.create_model("nf_resnet26", output_stride=16), seed=7).eval()
    ours = wszoo.create_model("nf_resnet26", output_stride=16).eval()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert ours.forward_features(x).shape[-1] == 4
        assert rel_diff(ours(x), ref(x)) < 1e-5


def test_stochastic_depth_rates_match_timm():
    ref = timm.create_model("nfnet_l0", drop_path_rate=0.2)
    ours = wszoo.create_model("nfnet_l0", drop_path_rate=0.2)
    rates = lambda m: [getattr(b.drop_path, "drop_prob", 0.0) for s in m.stages for b in s]  # noqa: E731
    assert rates(ours) == pytest.approx(rates(ref)) and max(rates(ours)) > 0.1
