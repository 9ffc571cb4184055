"""wszoo export: artifacts verified in ONNX Runtime / torch.export / TorchScript, inference-clean graphs,
metadata that travels, the dense-prediction builders, and the CLI's errors."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import wszoo
from tests.helpers import randomize_, run_cli, tree_snapshot
from wszoo.detection import build_detector, build_segmenter
from wszoo.tools.deploy import ExportError, export, inference_problems, onnx_metadata

TINY_DM = dict(depths=(1, 1, 1, 1), channels=(32, 64, 96, 128), stem_chs=32, group_size=16)


def shallow(model_class, arch, *args, **kwargs):
    """A one-block-per-stage instance of a family's own class, with its architecture's cfg: the family's
    code in full at a fraction of the export time."""
    model = model_class(*args, **kwargs)
    model.pretrained_cfg = wszoo.get_pretrained_cfg(arch)
    model.model_args = {}
    return model


# one model of every family: the embedded default (pretrained), and shallow instances of the others
FAMILIES = {
    "resnet_mini_gn_ws.fmnist": lambda: wszoo.create_model("resnet_mini_gn_ws.fmnist", pretrained=True),
    "resnet50_gn_ws": lambda: shallow(wszoo.models.GNWSResNet, "resnet50_gn_ws", (1, 1, 1, 1)),
    "resnetv2_50x1_bit": lambda: shallow(wszoo.models.ResNetV2, "resnetv2_50x1_bit", (1, 1, 1, 1)),
    "nf_regnet_b0": lambda: wszoo.create_model("nf_regnet_b0", depths=(1, 1, 1, 1)),
    "dm_nfnet_f0": lambda: wszoo.create_model("dm_nfnet_f0", **TINY_DM),  # TF-'SAME' padding, gamma in the act
    # a WS CNN under timm's VisionTransformer: a fixed token grid (the position embedding is laid out for it)
    "vit_tiny_r_s16_p8_224": lambda: wszoo.create_model("vit_tiny_r_s16_p8_224", img_size=64, depth=2),
}
# fixed-size exports: TF-'SAME' padding computed from the input size (see wszoo.export), a ViT's token grid
FIXED_SIZE = ("dm_", "vit_")


def model_of(name):
    torch.manual_seed(0)
    model = FAMILIES[name]()
    return model if name.endswith(".fmnist") else randomize_(model)


def ort_run(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_onnx_export_runs_in_onnxruntime_and_is_inference_clean(name, tmp_path):
    model = model_of(name).eval()
    size = 28 if "mini" in name else 64
    dynamic_size = not name.startswith(FIXED_SIZE)
    real = wszoo.training.data.fashion_mnist_check_image(model)
    report = export(model, tmp_path / "m.onnx", img_size=[size], dynamic_batch=True, dynamic_size=dynamic_size,
                    check_image=real)
    assert report.max_rel_diff <= 1e-4 and report.opset == 21
    assert {"random_batch1", "random_batch3"} <= set(report.checks)
    assert (real is not None) == ("mini" in name and wszoo.training.data.Path(
        wszoo.training.data.FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz").is_file())
    assert ("real_image" in report.checks) == (real is not None)
    # ONNX Runtime on the file, independently of the export's own check, at batches 1 and 3 (and another size)
    for shape in [(1, size, size), (3, size, size)] + ([(2, size + 32, size)] if dynamic_size else []):
        x = torch.randn(shape[0], model.in_chans, *shape[1:])
        with torch.no_grad():
            assert rel(ort_run(report.path, x), model(x)) < 1e-4, shape
    graph = onnx.load(report.path)
    ops = {n.op_type for n in graph.graph.node}
    assert inference_problems(report.path) == []
    weights = {i.name for i in graph.graph.initializer}
    assert "BatchNormalization" not in ops
    assert all(n.input[0] not in weights for n in graph.graph.node if n.op_type in ("ReduceMean", "Sqrt"))
    if "_gn_ws" in name or "_bit" in name:
        assert "GroupNormalization" in ops and "InstanceNormalization" not in ops
    # the weights are the standardized ones, stored ready to use
    initializers = {i.name: torch.from_numpy(onnx.numpy_helper.to_array(i).copy()) for i in graph.graph.initializer}
    first = model.pretrained_cfg["first_conv"]
    stored = next(v for k, v in initializers.items() if first in k and v.dim() == 4)
    torch.testing.assert_close(stored, model.get_submodule(first).standardized_weight().detach())
    # metadata: in the file and beside it, enough to preprocess without wszoo
    meta = onnx_metadata(report.path)
    cfg = model.pretrained_cfg
    assert meta["architecture"] == cfg["architecture"] and meta["num_classes"] == model.num_classes
    assert meta["mean"] == list(cfg["mean"]) and meta["std"] == list(cfg["std"])
    assert meta["interpolation"] == cfg["interpolation"] and meta["crop_pct"] == cfg["crop_pct"]
    assert meta["input_size"] == list(cfg["input_size"]) and meta["inputs"][0]["dynamic"]["batch"]
    assert json.loads((tmp_path / "m.json").read_text()) == meta


def test_the_graph_check_catches_an_unfolded_model(tmp_path):
    """Exporting the WS model as it is puts the standardization (weight statistics) into the graph: the check
    that every export passes must see that."""
    model = wszoo.create_model("resnet_mini_gn_ws").eval()  # timm-style WS: batch_norm over the weights
    program = torch.onnx.export(model, (torch.randn(1, 1, 28, 28),), dynamo=True, opset_version=21, verbose=False)
    program.save(str(tmp_path / "unfolded.onnx"))
    problems = inference_problems(str(tmp_path / "unfolded.onnx"))
    assert problems and any("computed on the weights" in p or "training-mode" in p for p in problems)


@pytest.mark.parametrize("fmt, suffix, dtype", [("exported-program", ".pt2", "fp32"), ("torchscript", ".pt", "fp32"),
                                                ("exported-program", ".pt2", "bf16"), ("onnx", ".onnx", "fp16")])
def test_other_formats_and_dtypes_round_trip(fmt, suffix, dtype, tmp_path):
    model = model_of("resnet_mini_gn_ws.fmnist").eval()
    report = export(model, tmp_path / f"m{suffix}", dtype=dtype, dynamic_batch=True)
    assert report.format == fmt and report.max_rel_diff <= {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2}[dtype]
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        reference = model(x)
        if fmt == "exported-program":
            loaded = torch.export.load(report.path).module()
            out = loaded(x.to(torch.bfloat16 if dtype == "bf16" else torch.float32)).float()
        elif fmt == "torchscript":
            files = {"wszoo_export.json": ""}
            out = torch.jit.load(report.path, _extra_files=files)(x)
            assert json.loads(files["wszoo_export.json"])["architecture"] == "resnet_mini_gn_ws"
        else:
            session = ort.InferenceSession(report.path, providers=["CPUExecutionProvider"])
            out = torch.from_numpy(session.run(None, {"input": x.numpy().astype(np.float16)})[0]).float()
    assert rel(out, reference) < report.tolerance


@pytest.mark.parametrize("kind", ["fasterrcnn", "maskrcnn", "retinanet", "deeplabv3"])
def test_dense_prediction_models_export_with_dynamic_image_size(kind, tmp_path):
    """As torchvision documents for its own detectors: boxes, labels, scores (and masks) from ONNX Runtime
    match PyTorch's on a fixed image, at the export size and at another."""
    torch.manual_seed(0)
    if kind == "deeplabv3":
        model = build_segmenter("deeplabv3", "nf_regnet_b0", num_classes=4, output_stride=16)
    else:  # every candidate kept, so the comparison sees hundreds of detections, not none
        keep_all = {"retinanet": dict(score_thresh=0.0)}.get(kind, dict(box_score_thresh=0.0))
        model = build_detector(kind, "nf_regnet_b0", num_classes=3, min_size=64, max_size=96, **keep_all)
    report = export(model.eval(), tmp_path / f"{kind}.onnx", img_size=[64, 96], dynamic_size=True)
    assert set(report.checks) == {"random", "random_other_size"} and report.max_rel_diff <= 1e-4
    names = [o["name"] for o in report.outputs]
    assert names == (["out"] if kind == "deeplabv3" else ["boxes", "labels", "scores"] + (
        ["masks"] if kind == "maskrcnn" else []) if kind != "retinanet" else ["boxes", "scores", "labels"])
    if kind != "deeplabv3":
        assert report.outputs[0]["shape"][0] > 50, "the comparison must see detections"
        meta = onnx_metadata(report.path)
        assert meta["backbone"] == "nf_regnet_b0" and meta["min_size"] == [64] and meta["max_size"] == 96


def test_export_errors_are_one_line_and_leave_nothing(tmp_path):
    base = ["export", "resnet_mini_gn_ws"]
    out = tmp_path / "m.onnx"
    assert run_cli(base + ["-o", str(out)])[0] == 0
    before = tree_snapshot(tmp_path)
    for args, message in [
        (["-o", str(out)], "already exists; pass --force"),
        (["-o", str(tmp_path / "nodir" / "m.onnx")], "does not exist"),
        (["-o", str(tmp_path / "m.tflite")], "cannot tell the format from 'm.tflite'"),
        (["-o", str(tmp_path / "b.onnx"), "--dtype", "bf16"], "ONNX Runtime runs no bf16 convolutions"),
        (["-o", str(tmp_path / "t.onnx"), "--tolerance", "1e-30"], "above the tolerance 1e-30: not written"),
    ]:
        code, _, err = run_cli(base + args)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    code, _, err = run_cli(["export", "resnet_mini_gnws", "-o", str(tmp_path / "u.onnx")])
    assert code == 2 and "Unknown model 'resnet_mini_gnws'. Did you mean: resnet_mini_gn_ws" in err
    code, _, err = run_cli(["export", "dm_nfnet_f0", "--dynamic-size", "-o", str(tmp_path / "dm.onnx")])
    assert code == 2 and "pads TF-'SAME' from the input size" in err
    assert tree_snapshot(tmp_path) == before, "a failed export must leave no file behind"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_model_that_does_not_export_names_itself(tmp_path):
    class Untraceable(torch.nn.Module):
        def forward(self, x):
            return x.sum() if x.sum().item() > 0 else x  # data-dependent control flow

    with pytest.raises(ExportError, match="Untraceable does not export to exported-program"):
        export(Untraceable(), tmp_path / "u.pt2", img_size=[8])
    assert list(tmp_path.iterdir()) == []


def test_missing_onnxruntime_names_the_extra(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_ort(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'", name="onnxruntime")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ort)
    with pytest.raises(ExportError, match=r"onnxruntime is missing\): pip install 'wszoo\[export\]'"):
        export(wszoo.create_model("resnet_mini_gn_ws"), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50_gn_ws", "resnetv2_50x1_bit", "nf_resnet50", "dm_nfnet_f0", "eca_nfnet_l0",
                                  "vit_small_r26_s32_224"])
def test_full_size_models_export_and_verify(name, tmp_path):
    model = randomize_(wszoo.create_model(name)).eval()
    dynamic_size = not name.startswith(FIXED_SIZE)
    report = export(model, tmp_path / "m.onnx", dynamic_batch=True, dynamic_size=dynamic_size)
    assert report.max_rel_diff <= 1e-4 and inference_problems(report.path) == []
