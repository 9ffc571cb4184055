"""timm's model test battery (tests/test_models.py in timm's repository), in spirit, on every registered model:
cfg fields and pooling, headless forms, forward_intermediates and every feature wrapper, TorchScript in
train and eval, FX (torch.fx and torchvision's create_feature_extractor) forward, backward and scripted.
Inputs are small, as timm's battery keeps them. `make test` runs the per-model checks on one model per code
path (tests/models/variants.py: 11 models); every other registered CNN (the deeper and wider copies, and the
models over 100M parameters) runs them in the slow set (`make test-slow`).

Each model is built once (a module-scoped fixture, so pytest runs one model's checks together) and every
check works on a deep copy of it."""
import copy
import re

import pytest
import torch
import torch.nn.functional as F
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from torchvision.models.feature_extraction import create_feature_extractor

import wszoo
from tests.helpers import randomize_
from tests.models.variants import CNNS, REPRESENTATIVES
from wszoo.features import FEATURE_CLASSES, wrap_features

ALL = CNNS
PARAMS = [n if n in REPRESENTATIVES else pytest.param(n, marks=pytest.mark.slow) for n in ALL]
SIZE = 32  # stride 32 reaches 1x1 here (the 28 px minis stop at stride 4: 8x8)
CFG_FIELDS = ("num_classes", "input_size", "pool_size", "crop_pct", "crop_mode", "interpolation", "mean", "std",
              "first_conv", "classifier", "architecture", "tag")


@pytest.fixture(scope="module", params=PARAMS)
def built(request):
    """(name, model with every parameter random, 7 classes): built once per model for all its checks."""
    torch.manual_seed(0)
    return request.param, randomize_(wszoo.create_model(request.param, num_classes=7), seed=1)


def sample(model, batch=2, size=SIZE):
    return torch.randn(batch, model.in_chans, size, size, generator=torch.Generator().manual_seed(2))


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


# --- cfgs and pooling -------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ALL)
def test_cfg_fields_and_pool_size(arch):
    """Every cfg (the architecture's and each tag's) carries the fields timm's cfg checks read, and pool_size is
    what forward_features gives at input_size (on the meta device: shapes without arithmetic)."""
    with torch.device("meta"):
        model = wszoo.create_model(arch)
        keys = model.state_dict()
        for name in [arch] + wszoo.list_pretrained(f"{arch}.*"):
            cfg = wszoo.get_pretrained_cfg(name)
            assert not [f for f in CFG_FIELDS if f not in cfg], name
            feats = model.forward_features(torch.empty(1, *cfg["input_size"]))
            assert tuple(feats.shape[-2:]) == tuple(cfg["pool_size"]), (name, feats.shape, cfg["pool_size"])
            assert f"{cfg['classifier']}.weight" in keys and f"{cfg['first_conv']}.weight" in keys


def test_headless_forms_match_timms(built):
    """num_classes=0 pools to (N, num_features); global_pool='' returns forward_features' map, built so or
    by reset_classifier(0, ''), as timm's models do."""
    name, model = built
    model = copy.deepcopy(model).eval()
    x = sample(model, batch=1)
    with torch.no_grad():
        feats = model.forward_features(x)
        model.reset_classifier(0)
        assert model(x).shape == (1, model.num_features)
        model.reset_classifier(0, "")
        assert torch.equal(model(x), feats) and model.global_pool_type == ""
        model.reset_classifier(3, "avg")
        assert model(x).shape == (1, 3)
    with torch.device("meta"):  # the constructor's argument, checked without building weights
        assert wszoo.create_model(name, num_classes=0, global_pool="").global_pool_type == ""
        if name.startswith("resnetv2"):  # a 1x1-conv classifier: timm's BiT then gives a map of logits
            assert wszoo.create_model(name, num_classes=5, global_pool="")(
                torch.empty(1, 3, 64, 64)).shape == (1, 5, 2, 2)
        else:
            with pytest.raises(ValueError, match="global_pool='' \\(no pooling\\) needs num_classes=0"):
                wszoo.create_model(name, num_classes=5, global_pool="")


def test_unpooled_features_from_create_model():
    x = torch.randn(1, 3, 64, 64)
    torch.manual_seed(0)
    model = wszoo.create_model("resnet50_gn_ws", num_classes=0, global_pool="").eval()
    with torch.no_grad():
        assert model(x).shape == (1, 2048, 2, 2) and torch.equal(model(x), model.forward_features(x))


# --- forward_intermediates and the feature wrappers ------------------------------------------------------
def test_forward_intermediates(built):
    model = copy.deepcopy(built[1]).eval()
    x = sample(model, batch=1)
    info = model.feature_info
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        assert torch.equal(final, model.forward_features(x))
        assert [m.shape[1] for m in maps] == [f["num_chs"] for f in info]
        assert [SIZE // m.shape[-1] for m in maps] == [f["reduction"] for f in info]
        assert all(torch.equal(a, b) for a, b in zip(model.forward_intermediates(x, indices=2, intermediates_only=True),
                                                     maps[-2:], strict=True))
        early = model.forward_intermediates(x, indices=[2, 0], stop_early=True, intermediates_only=True)
        assert len(early) == 2 and torch.equal(early[0], maps[0]) and torch.equal(early[1], maps[2])
        model.set_grad_checkpointing(True)
        assert rel(model.forward_intermediates(x)[0], final) < 1e-5  # checkpointing is inert without grad
    with pytest.raises(ValueError, match="out of range"):
        model.forward_intermediates(x, indices=[len(info)])
    pruned = copy.deepcopy(model).eval()
    assert pruned.prune_intermediate_layers([1, 2]) == [1, 2]
    with torch.no_grad():
        kept = pruned.forward_intermediates(x, indices=[1, 2], intermediates_only=True)
        assert all(torch.equal(a, b) for a, b in zip(kept, maps[1:3], strict=True))
        assert pruned(x).shape[1] == info[2]["num_chs"] and pruned.num_features == info[2]["num_chs"]
    model.train()  # (last: BCN's running estimates move in training)
    with_ckpt, _ = model.forward_intermediates(x)  # checkpointed per block, as forward_features
    with_ckpt.sum().backward()
    head = model.pretrained_cfg["classifier"].split(".")[0]
    assert [n for n, p in model.named_parameters() if p.grad is None and not n.startswith(head)] == []


def test_every_feature_class_gives_the_same_maps(built):
    model = copy.deepcopy(built[1]).eval()
    x = sample(model, batch=1)
    indices = (1, 2, len(model.feature_info) - 1)
    with torch.no_grad():
        reference = model.forward_intermediates(x, indices=list(indices), intermediates_only=True)
        for kind in FEATURE_CLASSES:
            features = wrap_features(copy.deepcopy(model), out_indices=indices, feature_cls=kind)
            out = features(x)
            out = list(out.values()) if isinstance(out, dict) else out
            assert features.feature_info.channels() == [m.shape[1] for m in reference], kind
            assert all(torch.equal(a, b) for a, b in zip(out, reference, strict=True)), kind


def test_create_model_takes_feature_cls_and_feature_cfg():
    x = torch.randn(1, 3, 64, 64)
    for kind in FEATURE_CLASSES:
        model = wszoo.create_model("nf_regnet_b0", features_only=True, feature_cls=kind, out_indices=(2, 4))
        cfg_model = wszoo.create_model("nf_regnet_b0", features_only=True, feature_cfg={"feature_cls": kind,
                                                                                         "out_indices": (2, 4)})
        for m in (model, cfg_model):
            out = m.eval()(x)
            assert [t.shape[1] for t in (out.values() if isinstance(out, dict) else out)] == [80, 960]
            assert m.pretrained_cfg["architecture"] == "nf_regnet_b0"
    hooked = wszoo.create_model("resnet50_gn_ws", features_only=True, feature_cls="hook",
                                feature_cfg={"return_dict": True})
    assert list(hooked(x)) == ["relu", "layer1", "layer2", "layer3", "layer4"]
    with pytest.raises(ValueError, match="unknown feature_cls 'graph'"):
        wszoo.create_model("nf_regnet_b0", features_only=True, feature_cls="graph")
    with pytest.raises(ValueError, match="feature_cls is for features_only=True"):
        wszoo.create_model("nf_regnet_b0", feature_cls="list")


@pytest.mark.parametrize("name", ["resnet50_gn_ws", "resnetv2_50x1_bit", "nf_resnet50", "resnet_mini_gn_ws"])
def test_layer_decay_groups_and_no_weight_decay(name):
    """timm's layer-wise decay and weight-decay helpers read group_matcher / no_weight_decay."""
    model = wszoo.create_model(name)
    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.5)
    scales = sorted({g["lr_scale"] for g in groups})
    assert len(scales) > 3 and scales[-1] == 1.0
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    fine, coarse = model.group_matcher(), model.group_matcher(coarse=True)
    assert fine != coarse
    stem = fine["stem"]
    assert re.match(stem, model.pretrained_cfg["first_conv"])
    skipped = model.no_weight_decay()
    assert all(n.endswith("gain") for n in skipped) and (bool(skipped) == name.startswith("nf_"))
    decay = param_groups_weight_decay(model, 0.05, no_weight_decay_list=skipped)
    no_decay = {id(p) for g in decay if g["weight_decay"] == 0.0 for p in g["params"]}
    assert all(id(p) in no_decay for n, p in model.named_parameters() if n in skipped)


# --- TorchScript --------------------------------------------------------------------------------------------
def test_torchscript_unfolded_train_and_eval(built):
    """The WS model scripts as it is (standardization recomputed), and the script equals eager in both modes."""
    model = copy.deepcopy(built[1])
    twin = copy.deepcopy(model)  # BCN's running estimates move in training: each side gets its own
    scripted = torch.jit.script(twin)
    x = sample(model)
    for mode in (False, True):
        model.train(mode)
        scripted.train(mode)
        with torch.set_grad_enabled(mode):
            out, out_scripted = model(x), scripted(x)
        assert rel(out_scripted, out) < 1e-5, (mode, rel(out_scripted, out))
    F.cross_entropy(out_scripted, torch.arange(2)).backward()
    assert all(p.grad is not None for p in twin.parameters())


# --- FX ---------------------------------------------------------------------------------------------------
def test_fx_forward_backward_and_scripted(built):
    """torch.fx traces the WS model (a graph per mode, as FX bakes in `self.training` branches: BCN's estimate
    updates); forward and gradients equal eager's, and the traced graph scripts. (torchvision's
    create_feature_extractor, through timm's FeatureGraphNet, is checked with the other feature classes.)"""
    model = copy.deepcopy(built[1]).eval()
    x = sample(model)
    traced = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        reference = model(x)
        assert rel(traced(x), reference) < 1e-6
        assert rel(torch.jit.script(traced)(x), reference) < 1e-5
    model.train()
    traced_train = torch.fx.symbolic_trace(copy.deepcopy(model))  # a copy: BCN's estimates move in training
    params, fx_params = dict(model.named_parameters()), dict(traced_train.named_parameters())
    names = sorted(params)
    assert names == sorted(fx_params)
    grads = torch.autograd.grad(F.cross_entropy(model(x), torch.arange(2)), [params[n] for n in names])
    fx_grads = torch.autograd.grad(F.cross_entropy(traced_train(x), torch.arange(2)), [fx_params[n] for n in names])
    assert max(rel(a, b) for a, b in zip(fx_grads, grads, strict=True)) < 1e-4


def test_torchvision_feature_extractor_on_a_ws_backbone():
    """Detection users cut WS backbones with torchvision's create_feature_extractor by module name."""
    torch.manual_seed(0)
    model = wszoo.create_model("resnet50_gn_ws").eval()
    extractor = create_feature_extractor(model, return_nodes={"layer2": "c3", "layer3": "c4", "layer4": "c5"})
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = extractor(x)
        _, maps = model.forward_intermediates(x, indices=[2, 3, 4])
    assert list(out) == ["c3", "c4", "c5"] and all(torch.equal(a, b) for a, b in zip(out.values(), maps, strict=True))
