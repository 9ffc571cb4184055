"""fold_ws, accumulate_ws, torch.compile / TorchScript / torch.export, channels-last, tune_cpu_allocator.

`make test` compiles a one-block-a-stage nf_regnet_b0; the slow set compiles it at full depth."""
import copy
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Conv2dSame

import wszoo
from wszoo.layers import ScaledWSConv2dSame, WSConv2d, WSLinear, is_ws_layer
from wszoo.speed import ws_layers

from .helpers import randomize_, rel_diff

# One small-input model per family (every WS layer kind: WSConv2d qiao/timm, ScaledWSConv2d, TF-SAME).
FAMILIES = ["resnet_mini_gn_ws", "resnet50_gn_ws", "resnetv2_50x1_bit", "nf_resnet26", "dm_nfnet_f0"]


def _model(name, **kw):
    torch.manual_seed(0)
    return randomize_(wszoo.create_model(name, num_classes=7, **kw))


def _input(model, size=48, batch=2):
    return torch.randn(batch, model.in_chans, size, size, generator=torch.Generator().manual_seed(1))


# --- fold_ws ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
def test_fold_ws_gives_plain_layers_and_the_same_outputs(name):
    model = _model(name).eval()
    x = _input(model)
    with torch.no_grad():
        ref = model(x)
        folded = wszoo.fold_ws(model)
        out = folded(x)
    assert ws_layers(folded) == [] and len(ws_layers(model)) > 0, \
        "fold_ws must leave no WS layer, and the source intact"
    assert rel_diff(out, ref) < 1e-5
    assert set(folded.state_dict()) <= set(model.state_dict()), "folded keys are a subset (gains are baked in)"
    assert folded is not model and not folded.training


def test_fold_ws_bakes_in_gain_and_gamma_and_keeps_dynamic_same_padding():
    layer = ScaledWSConv2dSame(6, 5, 3, stride=2, gamma=1.7, style="deepmind", eps=1e-4)
    with torch.no_grad():
        layer.gain.uniform_(0.5, 1.5)
    assert layer.dynamic_same_pad
    plain = wszoo.fold_ws(layer)
    assert isinstance(plain, Conv2dSame) and not is_ws_layer(plain)
    x = torch.randn(1, 6, 11, 13)
    with torch.no_grad():
        assert rel_diff(plain(x), layer(x)) < 1e-6
    static = wszoo.fold_ws(ScaledWSConv2dSame(6, 5, 3, stride=1))
    assert type(static) is nn.Conv2d and static.padding == (1, 1)


def test_fold_ws_linear_and_inplace():
    model = nn.Sequential(WSLinear(8, 4, style="bcn"), nn.ReLU(), WSLinear(4, 3, bias=False))
    model[0].weight.requires_grad_(False)
    x = torch.randn(5, 8)
    with torch.no_grad():
        ref = model(x)
    same = wszoo.fold_ws(model, inplace=True)
    assert same is model and type(model[0]) is nn.Linear and model[2].bias is None
    assert not model[0].weight.requires_grad and model[2].weight.requires_grad
    with torch.no_grad():
        assert rel_diff(model(x), ref) < 1e-6


@pytest.mark.parametrize("name", ["resnet_mini_gn_ws", "resnet_mini_bcn_ws", "resnetv2_50x1_bit", "nf_resnet26",
                                  "dm_nfnet_f0"])
def test_folded_models_script_and_export(name):
    folded = wszoo.fold_ws(_model(name).eval())
    x = _input(folded, size=40, batch=1)
    with torch.no_grad():
        ref = folded(x)
        scripted = torch.jit.script(folded)
        assert rel_diff(scripted(x), ref) < 1e-6
        exported = torch.export.export(folded, (x,)).module()
        assert rel_diff(exported(x), ref) < 1e-6


def test_folded_model_exports_to_onnx(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    folded = wszoo.fold_ws(_model("resnet_mini_gn_ws").eval())
    path = tmp_path / "m.onnx"
    torch.onnx.export(folded, (_input(folded, batch=1),), str(path))
    assert path.stat().st_size > 0


# --- accumulate_ws ---------------------------------------------------------------------------------
def _micro_batch_grads(model, x, y, accumulate):
    model.zero_grad(set_to_none=True)
    ctx = wszoo.accumulate_ws(model) if accumulate else torch.enable_grad()
    with ctx:
        for i in range(len(x)):
            (F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]) / len(x)).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name,checkpointing", [("resnet_mini_gn_ws", False), ("resnet50_gn_ws", True),
                                                ("resnetv2_50x1_bit", False), ("nf_resnet26", True)])
def test_accumulate_ws_gives_the_same_gradients(name, checkpointing):
    model = _model(name).train()
    model.set_grad_checkpointing(checkpointing)
    x, y = _input(model, size=32, batch=3), torch.tensor([1, 4, 6])
    plain = _micro_batch_grads(model, x, y, accumulate=False)
    accumulated = _micro_batch_grads(model, x, y, accumulate=True)
    assert plain.keys() == accumulated.keys() and any(n.endswith("gain") for n in plain) == name.startswith("nf")
    for n in plain:
        assert rel_diff(accumulated[n], plain[n]) < 1e-4, n
    assert not any(m.is_accumulating for _, m in ws_layers(model)), "the context must clean up"


def test_accumulate_ws_adds_to_existing_gradients_and_skips_frozen_layers():
    model = _model("resnet_mini_gn_ws").train()
    model.conv1.weight.requires_grad_(False)
    x, y = _input(model, size=16, batch=2), torch.tensor([0, 1])
    reference = _micro_batch_grads(model, x, y, accumulate=False)
    model.zero_grad(set_to_none=True)
    with wszoo.accumulate_ws(model):
        F.cross_entropy(model(x), y).backward()  # one micro-batch of 2 = the mean of the two of 1
    with wszoo.accumulate_ws(model):
        F.cross_entropy(model(x), y).backward()
    assert model.conv1.weight.grad is None
    for n, p in model.named_parameters():
        if n in reference:
            assert rel_diff(p.grad, 2 * reference[n]) < 1e-4, n


def test_accumulate_ws_applies_nothing_on_error_and_refuses_misuse():
    model = _model("resnet_mini_gn_ws").train()
    x = _input(model, size=16, batch=1)
    with pytest.raises(KeyError):
        with wszoo.accumulate_ws(model):
            model(x).sum().backward()
            raise KeyError("interrupted")
    assert all(p.grad is None for p in model.parameters() if p.dim() == 4), "no gradient may reach WS weights"
    assert not any(m.is_accumulating for _, m in ws_layers(model))
    with wszoo.accumulate_ws(model):
        with pytest.raises(RuntimeError, match="already inside"):
            with wszoo.accumulate_ws(model):
                pass
    with torch.no_grad(), pytest.raises(RuntimeError, match="gradients are disabled"):
        with wszoo.accumulate_ws(model):
            pass


def test_finetune_accum_steps_uses_accumulate_ws(monkeypatch, tmp_path):
    from wszoo.training import FinetuneConfig, engine, finetune

    from .data_fixtures import make_fashion_mnist

    data = make_fashion_mnist(tmp_path / "fm", n_train=6, n_test=4)
    entered = []
    real = engine.accumulate_ws

    def spy(model):
        entered.append(model)
        return real(model)

    monkeypatch.setattr(engine, "accumulate_ws", spy)
    finetune(FinetuneConfig(model="resnet_mini_gn_ws", dataset="fashion-mnist", data_dir=str(data), img_size=16,
                            epochs=1, batch_size=1, accum_steps=3, aug="none", output=str(tmp_path / "out"),
                            log_interval=0))
    assert len(entered) == 2, "6 images, micro-batches of 1, 3 per step: two accumulate_ws blocks"


# --- torch.compile, channels-last, autocast --------------------------------------------------------
# nf_regnet_b0 with one block a stage: every layer kind of the family in a quarter of the graph that dynamo and
# AOT autograd trace (most of the time here); its full depth in the slow set
@pytest.mark.parametrize("name, kwargs", [("resnet_mini_gn_ws", {}), ("nf_regnet_b0", {"depths": (1, 1, 1, 1)}),
                                          pytest.param("nf_regnet_b0", {}, marks=pytest.mark.slow)],
                         ids=["resnet_mini_gn_ws", "nf_regnet_b0_shallow", "nf_regnet_b0"])
def test_torch_compile_trains_and_evaluates(name, kwargs):
    model = _model(name, **kwargs)
    reference = copy.deepcopy(model)
    x, y = _input(model, size=32), torch.tensor([1, 2])
    compiled = torch.compile(model, backend="aot_eager", fullgraph=False)
    F.cross_entropy(compiled(x), y).backward()
    F.cross_entropy(reference(x), y).backward()
    for (n, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        if q.grad is not None:
            assert rel_diff(p.grad, q.grad) < 1e-4, n
    model.eval()
    reference.eval()
    with torch.no_grad():
        assert rel_diff(compiled(x), reference(x)) < 1e-5


def test_ws_layers_trace_into_one_graph():
    """A graph break inside a WS layer makes torch.compile split every layer into its own frame and
    recompile it per weight shape (seen on torch 2.11 with the autocast availability check)."""
    from wszoo.layers import CWNConv2d, P4WSConv2d, ScaledWSConv2d, WSConv2d, WSLinear

    for layer, x in [(WSConv2d(8, 16, 3, style="qiao"), torch.randn(1, 8, 8, 8)),
                     (ScaledWSConv2d(8, 16, 3), torch.randn(1, 8, 8, 8)),
                     (CWNConv2d(8, 16, 3, learnable_scale=True), torch.randn(1, 8, 8, 8)),
                     (P4WSConv2d(8, 4, 3), torch.randn(1, 8, 4, 8, 8)), (WSLinear(8, 4), torch.randn(2, 8))]:
        for mode in (True, False):
            explained = torch._dynamo.explain(layer.train(mode))(x)
            assert (explained.graph_count, explained.graph_break_count) == (1, 0), (type(layer).__name__, mode,
                                                                                     explained.break_reasons)


def test_channels_last_gives_the_same_forward_and_gradients():
    # float64: in float32 a max-pool tie broken differently by another conv algorithm can reroute a
    # stem gradient, which says nothing about the standardization
    model = _model("resnetv2_50x1_bit").double().train()
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x, y = _input(model, size=32).double(), torch.tensor([0, 3])
    out, out_cl = model(x), cl(x.contiguous(memory_format=torch.channels_last))
    assert rel_diff(out_cl, out) < 1e-10
    F.cross_entropy(out, y).backward()
    F.cross_entropy(out_cl, y).backward()
    conv = cl.stem.conv
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert conv.standardized_weight().is_contiguous(memory_format=torch.channels_last)
    for (n, p), q in zip(cl.named_parameters(), model.parameters(), strict=True):
        assert rel_diff(p.grad, q.grad) < 1e-9, n


def test_cached_eval_under_bf16_autocast_convolves_in_bf16_with_float32_statistics():
    conv = WSConv2d(8, 4, 3, style="qiao").eval()
    x = torch.randn(1, 8, 6, 6)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x)
        out2 = conv(x)
    assert out.dtype == torch.bfloat16 and torch.equal(out, out2)
    assert conv.cached_weight().dtype == torch.float32
    with torch.no_grad():
        assert rel_diff(out.float(), conv(x)) < 2e-2


# --- allocator ---------------------------------------------------------------------------------------
def test_tune_cpu_allocator_sets_glibc_thresholds():
    code = "import wszoo, platform; ok = wszoo.tune_cpu_allocator(); print(ok, platform.libc_ver()[0])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == ("True" if out[1:] == ["glibc"] else "False")
