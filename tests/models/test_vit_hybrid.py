"""The R+ViT hybrids against timm's own ``vit_*_r*`` models (not ours): the same state dict key for key, the same
outputs with random values in every parameter, timm's model API and battery (TorchScript, FX, feature wrappers)
at the models' fixed token grid, the WS machinery (fold, eval cache, accumulate_ws, grouped standardization),
and pretrained loading through the Hub path with timm's position-embedding resampling.

The tiny and small hybrids run in the default set at a 64 px grid; the R50 ones (98M and 329M parameters) are
in the slow set."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save
from torchvision.models.feature_extraction import create_feature_extractor

import wszoo
from tests.helpers import randomize_, rel_diff
from tests.hub_fixtures import make_hf_cache
from wszoo.features import FEATURE_CLASSES, wrap_features

HYBRIDS = [n for n in wszoo.list_models() if wszoo.registry.model_family(n) == "vit_hybrid"]
SMALL = ["vit_tiny_r_s16_p8_224", "vit_small_r26_s32_224"]
PARAMS = [n if n in SMALL else pytest.param(n, marks=pytest.mark.slow) for n in HYBRIDS]
SIZE = 64  # the token grid the checks build the models for (timm takes the same img_size)
COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


def sample(batch=2, size=SIZE, in_chans=3):
    return torch.randn(batch, in_chans, size, size, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module", params=PARAMS)
def pair(request):
    """(name, timm's model with every parameter random, ours with timm's state dict), 7 classes, 64 px grid."""
    name = request.param
    torch.manual_seed(0)
    ref = randomize_(timm.create_model(name, img_size=SIZE, num_classes=7), seed=1)
    ours = wszoo.create_model(name, img_size=SIZE, num_classes=7)
    ours.load_state_dict(ref.state_dict())
    return name, ref, ours


def test_registry_has_the_issue_s_architectures():
    assert sorted(HYBRIDS) == sorted(["vit_tiny_r_s16_p8_224", "vit_tiny_r_s16_p8_384", "vit_small_r26_s32_224",
                       "vit_small_r26_s32_384", "vit_base_r50_s16_224", "vit_base_r50_s16_384",
                       "vit_large_r50_s32_224", "vit_large_r50_s32_384"])


@pytest.mark.parametrize("name", HYBRIDS)
def test_state_dict_and_parameter_count_are_timms(name):
    """Key for key (names, order, shapes) at the published size, on the meta device (no memory)."""
    with torch.device("meta"):
        ref, ours = timm.create_model(name).state_dict(), wszoo.create_model(name).state_dict()
    assert list(ours) == list(ref)
    assert all(ours[k].shape == ref[k].shape for k in ref)


def test_outputs_equal_timms_in_eval_and_training(pair):
    name, ref, ours = pair
    x = sample()
    for mode in (False, True):
        ref.train(mode)
        ours.train(mode)
        with torch.no_grad():
            assert torch.equal(ours(x), ref(x)), (name, mode)
    ref.eval()
    ours.eval()
    # the CNN alone: timm's ResNetV2 / stem against ours, map for map
    with torch.no_grad():
        assert torch.equal(ours.patch_embed.backbone(x), ref.patch_embed.backbone(x))


def test_the_cnn_is_ws_with_tf_same_padding(pair):
    """The numerics the checkpoints were trained with: timm-style WS, eps 1e-8, TF 'SAME' convs."""
    _, _, ours = pair
    convs = [m for m in ours.patch_embed.backbone.modules() if isinstance(m, wszoo.layers.WSLayer)]
    assert convs and all(isinstance(m, wszoo.layers.WSConv2dSame) for m in convs)
    assert {(m.ws_style, m.ws_eps) for m in convs} == {("timm", 1e-8)}
    first = convs[0]
    w = first.weight.detach().double().flatten(1)
    expected = (w - w.mean(1, keepdim=True)) / (w.var(1, unbiased=False, keepdim=True) + 1e-8).sqrt()
    assert rel_diff(first.forward_weight().detach().double().flatten(1), expected) < 1e-6


def test_forward_backward_reaches_every_parameter(pair):
    _, _, ours = pair
    model = copy.deepcopy(ours).train()
    F.cross_entropy(model(sample()), torch.arange(2)).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None or not p.grad.isfinite().all()] == []


def test_timm_model_api(pair):
    """timm's ViT API as timm's hybrids have it: tokens from forward_features, pooled pre-logits, classifier
    reset, forward_intermediates over the blocks, data config."""
    name, ref, ours = pair
    model = copy.deepcopy(ours).eval()
    ref = copy.deepcopy(ref).eval()
    x = sample(batch=1)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert torch.equal(feats, ref.forward_features(x))
        assert model.forward_head(feats, pre_logits=True).shape == (1, model.num_features)
        final, blocks = model.forward_intermediates(x, indices=[2, 5])
        ref_final, ref_blocks = ref.forward_intermediates(x, indices=[2, 5])
        assert torch.equal(final, ref_final) and all(torch.equal(a, b) for a, b in zip(blocks, ref_blocks, strict=True))
        model.reset_classifier(0)
        assert model(x).shape == (1, model.num_features) and model.num_classes == 0
        model.reset_classifier(3, "avg")
        assert model(x).shape == (1, 3) and model.global_pool_type == "avg"
    data_cfg = timm.data.resolve_data_config({}, model=model)
    assert data_cfg["input_size"] == model.pretrained_cfg["input_size"] and data_cfg["mean"] == (0.5, 0.5, 0.5)
    assert model.pretrained_cfg["first_conv"] + ".weight" in model.state_dict()


def test_torchscript_and_fx_equal_eager(pair):
    _, _, ours = pair
    model = copy.deepcopy(ours).eval()
    x = sample()
    with torch.no_grad():
        reference = model(x)
        assert rel_diff(torch.jit.script(copy.deepcopy(model))(x), reference) < 1e-5
        traced = torch.fx.symbolic_trace(copy.deepcopy(model))
        assert rel_diff(traced(x), reference) < 1e-6
    model.train()
    traced = torch.fx.symbolic_trace(copy.deepcopy(model))
    params, fx_params = dict(model.named_parameters()), dict(traced.named_parameters())
    names = sorted(params)
    grads = torch.autograd.grad(F.cross_entropy(model(x), torch.arange(2)), [params[n] for n in names])
    fx_grads = torch.autograd.grad(F.cross_entropy(traced(x), torch.arange(2)), [fx_params[n] for n in names])
    assert max(rel_diff(a, b) for a, b in zip(fx_grads, grads, strict=True)) < 1e-4


def test_features_only_gives_the_cnn_maps_for_every_feature_class(pair):
    """features_only is the CNN: stem and stage maps, the same through every wrapper, and the same as timm's
    ResNetV2 (or stem) computes them."""
    name, ref, ours = pair
    backbone_ref = ref.patch_embed.backbone.eval()
    x = sample(batch=1)
    levels = len(ours.patch_embed.backbone.feature_info)
    with torch.no_grad():
        if levels > 1:
            expected = backbone_ref.forward_intermediates(x, indices=list(range(levels)), intermediates_only=True)
        else:  # the tiny model's CNN is timm's stem Sequential: its activation before the pool
            expected = [backbone_ref.norm(backbone_ref.conv(x))]
        for kind in FEATURE_CLASSES:
            features = wrap_features(copy.deepcopy(ours).eval(), feature_cls=kind)
            out = features(x)
            out = list(out.values()) if isinstance(out, dict) else out
            assert len(out) == levels and all(torch.equal(a, b) for a, b in zip(out, expected, strict=True)), kind
            assert features.feature_info.reduction() == ([2] if levels == 1 else [2, 4, 8, 16, 32][:levels])
    built = wszoo.create_model(name, img_size=SIZE, features_only=True, out_indices=(-1,))
    assert built.pretrained_cfg["architecture"] == name
    assert built.feature_info.channels() == [ours.patch_embed.backbone.feature_info[-1]["num_chs"]]
    # torchvision's extractor on the whole model, by module name
    if levels > 1:
        extractor = create_feature_extractor(copy.deepcopy(ours).eval(),
                                             return_nodes={"patch_embed.backbone.stages.1": "c3"})
        with torch.no_grad():
            assert torch.equal(extractor(x)["c3"], expected[2])


def test_ws_machinery(pair):
    """Folded WS equals the live model, the eval cache serves until a weight changes, accumulate_ws gives the
    micro-batch gradients, and grouped standardization trains exactly as layer by layer (float64)."""
    _, _, ours = pair
    x = sample(batch=4)
    model = copy.deepcopy(ours).eval()
    with torch.no_grad():
        reference = model(x)
        assert rel_diff(wszoo.fold_ws(model)(x), reference) < 1e-6
        assert torch.equal(model(x), reference)  # second eval pass: from the cache
        conv = model.patch_embed.backbone.get_submodule(model.pretrained_cfg["first_conv"].split("backbone.")[1])
        conv.weight.mul_(2.0).add_(0.1)
        assert not torch.equal(model(x), reference)  # a changed weight is re-standardized
    per_layer = copy.deepcopy(ours).double().train()
    grouped = wszoo.group_ws(copy.deepcopy(ours).double().train(), True)
    assert wszoo.is_grouped(grouped)
    targets = torch.arange(4) % 7
    for net in (per_layer, grouped):
        F.cross_entropy(net(x.double()), targets).backward()
    for (n, a), b in zip(per_layer.named_parameters(), grouped.parameters(), strict=True):
        assert rel_diff(b.grad, a.grad) < 1e-12, n
    accumulated = copy.deepcopy(ours).double().train()
    with wszoo.accumulate_ws(accumulated):
        for part in (slice(0, 2), slice(2, 4)):
            (F.cross_entropy(accumulated(x[part].double()), targets[part]) / 2).backward()
    for (n, a), b in zip(per_layer.named_parameters(), accumulated.parameters(), strict=True):
        assert rel_diff(b.grad, a.grad) < 1e-9, n


def test_pretrained_through_the_hub_path_and_position_resampling(tmp_path, monkeypatch):
    """A timm/ repo in an offline HF cache loads key for key; at another img_size the position embedding is
    resampled as timm's own loader does it (timm reading the same file is the reference); in_chans=1 adapts
    the first conv as timm does."""
    name, tag = "vit_tiny_r_s16_p8_224", "augreg_in21k_ft_in1k"
    cache = tmp_path / "hf"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    published = randomize_(timm.create_model(name), seed=5)
    weights = tmp_path / "model.safetensors"
    data = save({k: v.contiguous() for k, v in published.state_dict().items()})
    weights.write_bytes(data)
    make_hf_cache(cache, f"timm/{name}.{tag}", {"model.safetensors": data}, COMMIT)
    x = sample(batch=1, size=224)
    with torch.no_grad():
        assert torch.equal(wszoo.create_model(name, pretrained=True).eval()(x), published.eval()(x))
        for kwargs in ({"img_size": 96}, {"img_size": 96, "in_chans": 1}):
            ours = wszoo.create_model(name, pretrained=True, **kwargs).eval()
            ref = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(weights)},
                                    **kwargs).eval()
            # stride 4 x patch 8: a 3 x 3 grid at 96 px, plus the class token
            assert ours.pos_embed.shape == ref.pos_embed.shape == (1, 1 + 3 * 3, 192)
            y = sample(batch=1, size=96, in_chans=kwargs.get("in_chans", 3))
            assert rel_diff(ours(y), ref(y)) < 1e-6, kwargs
