"""Deployment: ``wszoo export`` and :func:`export` (``wszoo.export``). A model is folded
(:func:`wszoo.fold_ws`: plain convs holding the standardized weights, so the graph carries no weight
statistics and no training-mode BatchNormalization), put in eval mode, exported, and then *verified*: the
exported artifact itself (ONNX Runtime for ONNX, ``torch.export.load`` / ``torch.jit.load`` for the
others) is run and compared with the PyTorch model; above the tolerance the export fails and nothing is
left at the output path.

Formats: ``onnx`` (``torch.onnx`` dynamo exporter, opset 21 by default, where ONNX's GroupNormalization
takes PyTorch's per-channel scale and bias; torchvision's detectors through the TorchScript-based exporter,
as torchvision documents for its own), ``exported-program`` (``.pt2``) and ``torchscript`` (``.pt``). The
preprocessing a serving stack needs (architecture, tag, input size, mean/std, interpolation, crop_pct,
class count) travels with the file: ONNX ``metadata_props``, TorchScript and ExportedProgram extra files,
and a JSON file beside every export.
"""
import contextlib
import copy
import importlib.metadata
import json
import logging
import math
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import Conv2dSame

from ..detection.export_checks import detection_output_diff, is_detector
from ..files import check_writable_parent
from ..speed import fold_ws
from .onnx_checks import inference_problems, onnx_metadata

__all__ = ["export", "ExportError", "ExportReport", "FORMATS", "DTYPES", "DEFAULT_OPSET", "inference_problems",
           "require_onnxruntime", "onnx_metadata"]

_logger = logging.getLogger("wszoo")


def _installed_version() -> str:
    """wszoo's version as installed (read from the package metadata: no import of the package itself)."""
    try:
        return importlib.metadata.version("wszoo")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


#: format -> file suffix
FORMATS = {"onnx": ".onnx", "exported-program": ".pt2", "torchscript": ".pt"}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: largest relative difference accepted by default, per dtype
TOLERANCES = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2}
#: opset 21: ONNX's GroupNormalization with per-channel scale and bias (what PyTorch's GroupNorm computes)
DEFAULT_OPSET = 21
DETECTOR_OPSET = 17  # the TorchScript-based exporter torchvision's detectors need
_METADATA_FILE = "wszoo_export.json"


class ExportError(ValueError):
    """An export that cannot be made or did not verify; nothing is left at the output path."""


@dataclass
class ExportReport:
    """What :func:`export` wrote and how the artifact compared with PyTorch."""

    path: str
    format: str
    dtype: str
    opset: Optional[int]
    inputs: List[Dict[str, Any]]
    outputs: List[Dict[str, Any]]
    max_rel_diff: float
    tolerance: float
    checks: Dict[str, float] = field(default_factory=dict)
    metadata: Dict[str, Any] = field(default_factory=dict)
    metadata_path: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def require_onnxruntime():
    """``onnxruntime`` (and ``onnx``), or an :class:`ExportError` saying which extra installs them."""
    try:
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError as e:
        raise ExportError(f"ONNX export needs onnx, onnxscript and onnxruntime ({e.name} is missing): "
                          "pip install 'wszoo[export]'") from None
    return onnxruntime


def _has_dynamic_padding(model: nn.Module) -> bool:
    """Strided convs with TF-'SAME' padding computed from the input size (DeepMind's NFNets; folded, they are
    timm's Conv2dSame). (Stride-1 'SAME' pooling pads a constant amount, which torch.export resolves.)"""
    return any(getattr(m, "dynamic_same_pad", False) or isinstance(m, Conv2dSame) for m in model.modules())


def _flatten_outputs(out: Any) -> Tuple[List[str], List[torch.Tensor]]:
    """A model's outputs as (names, tensors): a tensor, a list/tuple of them, a dict, or a detector's list
    of dicts (the first image)."""
    if isinstance(out, torch.Tensor):
        return ["logits"], [out]
    if isinstance(out, dict):
        return list(out), list(out.values())
    if isinstance(out, (list, tuple)) and out and isinstance(out[0], dict):
        return list(out[0]), list(out[0].values())
    if isinstance(out, (list, tuple)):
        return [f"output_{i}" for i in range(len(out))], list(out)
    raise ExportError(f"cannot export a model whose output is a {type(out).__name__}")


def metadata_for(model: nn.Module, fmt: str, dtype: str, inputs: List[Dict[str, Any]],
                 outputs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """What a serving stack needs to preprocess without wszoo: a classifier's pretrained cfg; a detector's
    own transform (it normalizes and resizes inside the graph) and its backbone."""
    meta: Dict[str, Any] = {"model_class": type(model).__name__}
    cfg = getattr(model, "pretrained_cfg", None) or getattr(getattr(model, "backbone", None), "pretrained_cfg",
                                                              None) or {}
    keep = ("architecture", "tag", "input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode",
            "num_classes")
    for key in keep:
        if cfg.get(key) is not None:
            meta[key] = list(cfg[key]) if isinstance(cfg[key], tuple) else cfg[key]
    if not hasattr(model, "model_args"):  # a detector or segmenter around a wszoo backbone
        meta["backbone"] = meta.pop("architecture", None)
        meta.pop("num_classes", None)
    if getattr(model, "num_classes", None) is not None:
        meta["num_classes"] = model.num_classes
    if is_detector(model):
        t = model.transform
        meta.update({"image_mean": list(t.image_mean), "image_std": list(t.image_std), "min_size": list(t.min_size),
                     "max_size": t.max_size, "input_range": "RGB in [0, 1], normalized and resized inside the graph"})

    meta.update({"format": fmt, "dtype": dtype, "inputs": inputs, "outputs": outputs,
                 "wszoo_version": _installed_version()})
    return meta


def _example_input(model: nn.Module, img_size: Optional[Sequence[int]], batch_size: int, dtype: torch.dtype
                   ) -> Union[torch.Tensor, List[torch.Tensor]]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    chans = getattr(model, "in_chans", None) or (cfg.get("input_size") or (3,))[0]
    size = list(img_size) if img_size else list((cfg.get("input_size") or (3, 224, 224))[1:])
    if len(size) == 1:
        size = size * 2
    gen = torch.Generator().manual_seed(0)
    if is_detector(model):
        return [torch.rand(3, *size, generator=gen).to(dtype)]
    return torch.randn(batch_size, chans, *size, generator=gen).to(dtype)


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    if a.shape != b.shape:
        return math.inf
    if a.numel() == 0:
        return 0.0
    if not a.is_floating_point():
        return 0.0 if torch.equal(a, b) else math.inf
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


class _Artifact:
    """An exported file loaded back for verification, called like the model."""

    def __init__(self, path: str, fmt: str, input_names: List[str], detector: bool) -> None:
        self.fmt, self.detector = fmt, detector
        if fmt == "onnx":
            ort = require_onnxruntime()
            options = ort.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()
            self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            self.input_names = [i.name for i in self.session.get_inputs()]
        elif fmt == "exported-program":
            self.module = torch.export.load(path).module()
        else:
            self.module = torch.jit.load(path)

    def __call__(self, x: Union[torch.Tensor, List[torch.Tensor]]) -> List[torch.Tensor]:
        if self.fmt == "onnx":
            arrays = x if isinstance(x, list) else [x]
            feed = {name: a.detach().cpu().numpy() for name, a in zip(self.input_names, arrays, strict=True)}
            return [torch.from_numpy(o) for o in self.session.run(None, feed)]
        with torch.no_grad():
            return _flatten_outputs(self.module(x))[1]


@contextlib.contextmanager
def _quiet_exporters() -> Iterator[None]:
    """The exporters' optimizer passes log every rewrite at INFO: keep them to warnings while we export."""
    loggers = [logging.getLogger(n) for n in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export", "torch._export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _dynamic_dims(plan: "_Plan") -> Dict[int, Any]:
    """torch.export's spec of the input's dynamic dimensions (``{}``: all static)."""
    dims: Dict[int, Any] = {}
    if plan.dynamic_batch:
        dims[0] = torch.export.Dim("batch", min=1, max=1024)
    if plan.dynamic_size:
        dims[2], dims[3] = torch.export.Dim("height", min=8, max=4096), torch.export.Dim("width", min=8, max=4096)
    return dims


def _export_onnx(model: nn.Module, example: Any, tmp: Path, plan: "_Plan") -> None:
    require_onnxruntime()
    if plan.detector:  # torchvision documents its detectors with the TorchScript-based exporter
        with _quiet_exporters():
            torch.onnx.export(model, (example,), str(tmp), dynamo=False, opset_version=plan.opset,
                              input_names=["images"], output_names=plan.output_names,
                              dynamic_axes={"images": [1, 2]} if plan.dynamic_size else None)
        return
    dims = _dynamic_dims(plan)
    with _quiet_exporters():
        program = torch.onnx.export(model, (example,), dynamo=True, opset_version=plan.opset, input_names=["input"],
                                    output_names=plan.output_names, dynamic_shapes=(dims,) if dims else None,
                                    verbose=False)
    program.save(str(tmp), external_data=sum(p.numel() * p.element_size() for p in model.parameters()) > 1.5e9)


def _export_torch(model: nn.Module, example: Any, tmp: Path, plan: "_Plan", metadata: Dict[str, Any]) -> None:
    extra = {_METADATA_FILE: json.dumps(metadata)}
    if plan.format == "torchscript":
        torch.jit.save(torch.jit.script(model), str(tmp), _extra_files=extra)
        return
    dims = _dynamic_dims(plan)
    with _quiet_exporters():
        program = torch.export.export(model, (example,), dynamic_shapes=(dims,) if dims else None)
    torch.export.save(program, str(tmp), extra_files=extra)


@dataclass
class _Plan:
    """One export request, checked: what to write and how to verify it."""

    path: Path
    format: str
    dtype: str
    opset: Optional[int]
    tolerance: float
    dynamic_batch: bool
    dynamic_size: bool
    detector: bool
    output_names: List[str] = field(default_factory=list)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def _plan(model: nn.Module, path: Path, fmt: Optional[str], dtype: str, opset: Optional[int],
          tolerance: Optional[float], dynamic_batch: bool, dynamic_size: bool, force: bool) -> _Plan:
    """Everything that can be refused before any work: format, dtype, sizes, the output path."""
    fmt = fmt or next((f for f, suffix in FORMATS.items() if path.suffix == suffix), None)
    if fmt is None:
        raise ExportError(f"cannot tell the format from {path.name!r}: use a .onnx, .pt2 or .pt file or pass format")
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if fmt == "onnx" and dtype == "bf16":
        raise ExportError("ONNX Runtime runs no bf16 convolutions (its CPU provider rejects the graph): export "
                          "bf16 as --format exported-program or torchscript, or ONNX as fp16")
    detector = is_detector(model)
    if detector and (fmt != "onnx" or dtype != "fp32" or dynamic_batch):
        raise ExportError("detectors export to ONNX in fp32, one image (dynamic image size with dynamic_size), "
                          "as torchvision documents for its own")
    if dynamic_size and _has_dynamic_padding(model):
        raise ExportError("this model pads TF-'SAME' from the input size (DeepMind's NFNets): torch.export's "
                          "symbolic shapes through that padding take minutes even for a tiny net; export it at a "
                          "fixed size (without dynamic H/W), dynamic batch works")
    check_writable_parent(path, "output")
    for target in (path, path.with_suffix(".json")):
        if target.exists() and not force:
            raise ExportError(f"{target} already exists; pass --force (force=True) to replace it")
    opset = (opset or (DETECTOR_OPSET if detector else DEFAULT_OPSET)) if fmt == "onnx" else None
    tolerance = TOLERANCES[dtype] if tolerance is None else float(tolerance)
    return _Plan(path, fmt, dtype, opset, tolerance, dynamic_batch, dynamic_size, detector)


def export(
    model: nn.Module,
    path: Union[str, os.PathLike],
    format: Optional[str] = None,
    img_size: Optional[Sequence[int]] = None,
    batch_size: int = 1,
    dynamic_batch: bool = False,
    dynamic_size: bool = False,
    opset: Optional[int] = None,
    dtype: str = "fp32",
    tolerance: Optional[float] = None,
    force: bool = False,
    check_image: Optional[torch.Tensor] = None,
) -> ExportReport:
    """Fold, export and verify ``model`` (a wszoo model, a feature extractor, a detector or a segmenter).

    Args:
        path: the output file; its suffix gives the format unless ``format`` is given
            (``.onnx``, ``.pt2`` for ``exported-program``, ``.pt`` for ``torchscript``). A JSON file with the
            same stem and the metadata is written beside it.
        img_size: ``[H, W]`` or ``[S]`` of the example input (default the pretrained cfg's input size).
        batch_size: the example batch; ``dynamic_batch`` exports any batch, ``dynamic_size`` any image size
            (not for models whose TF-'SAME' padding depends on the size).
        opset: ONNX opset (default 21, or 17 for torchvision detectors).
        dtype: ``fp32``, ``fp16`` or ``bf16`` (not ONNX: ONNX Runtime has no bf16 convolutions).
        tolerance: largest relative difference to PyTorch accepted (default 1e-4 fp32, 1e-2 fp16, 5e-2 bf16).
        force: replace an existing output.
        check_image: a real, preprocessed image ``(C, H, W)`` the artifact must also reproduce (random inputs
            can miss what real ones exercise), e.g. :func:`wszoo.training.data.fashion_mnist_check_image`; used
            where the exported input size (or a dynamic one) allows it.

    Returns:
        An :class:`ExportReport`. Raises :class:`ExportError` (and leaves nothing at ``path``) when the
        model does not export or the artifact does not match PyTorch within ``tolerance``.
    """
    plan = _plan(model, Path(path), format, dtype, opset, tolerance, dynamic_batch, dynamic_size, force)
    reference_model = copy.deepcopy(model).float().eval()
    deploy = fold_ws(model).eval().to(plan.torch_dtype)
    # torch.export specializes a dimension of size 1, so a dynamic batch is traced with two images
    example = _example_input(model, img_size, max(batch_size, 2) if dynamic_batch else batch_size, plan.torch_dtype)
    with torch.no_grad():
        plan.output_names, reference = _flatten_outputs(deploy(example))
    shape = list(example[0].shape) if isinstance(example, list) else list(example.shape)
    inputs = [{"name": "images" if plan.detector else "input", "shape": shape,
               "dynamic": {"batch": dynamic_batch, "height_width": dynamic_size}}]
    outputs = [{"name": n, "shape": list(t.shape)} for n, t in zip(plan.output_names, reference, strict=True)]
    metadata = metadata_for(model, plan.format, dtype, inputs, outputs)
    target = plan.path
    with tempfile.TemporaryDirectory(prefix=".wszoo-export-", dir=target.resolve().parent) as tmp_dir:
        tmp = Path(tmp_dir) / target.name
        try:
            if plan.format == "onnx":
                _export_onnx(deploy, example, tmp, plan)
                _write_onnx_metadata(tmp, metadata)
            else:
                _export_torch(deploy, example, tmp, plan, metadata)
        except ExportError:
            raise
        except Exception as e:  # torch.onnx / torch.export / TorchScript raise many kinds
            raise ExportError(f"{type(model).__name__} does not export to {plan.format}: {_first_line(e)}") from e
        checks = _verify(tmp, plan, reference_model, example, check_image)
        worst = max(checks.values())
        if not worst <= plan.tolerance:
            raise ExportError(f"the exported {plan.format} differs from PyTorch by {worst:.3g} (largest relative "
                              f"difference, {max(checks, key=checks.get)}), above the tolerance {plan.tolerance:g}: "
                              "not written")
        problems = inference_problems(str(tmp)) if plan.format == "onnx" else []
        if problems:
            raise ExportError(f"the exported graph is not inference-clean: {'; '.join(problems[:3])}")
        sidecar = target.with_suffix(".json")
        (Path(tmp_dir) / sidecar.name).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
        for item in sorted(Path(tmp_dir).iterdir(), key=lambda p: p.name == target.name):  # the model file last
            os.replace(item, target.parent / item.name)
    _logger.info("exported %s to %s (%s, %s): largest relative difference to PyTorch %.2g",
                 metadata.get("architecture") or metadata["model_class"], target, plan.format, dtype, worst)
    return ExportReport(str(target), plan.format, dtype, plan.opset, inputs, outputs, worst, plan.tolerance, checks,
                        metadata, str(sidecar))


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _write_onnx_metadata(path: Path, metadata: Dict[str, Any]) -> None:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = f"wszoo.{key}", json.dumps(value)
    onnx.save(proto, str(path))


def _verify(path: Path, plan: _Plan, reference_model: nn.Module, example: Any,
            check_image: Optional[torch.Tensor]) -> Dict[str, float]:
    """Largest relative difference between the artifact and the (unfolded, fp32) PyTorch model, per input:
    the example, batches of 1 and 3 (dynamic batch), another image size (dynamic size), and the real
    ``check_image`` where it fits."""
    artifact = _Artifact(str(path), plan.format, plan.output_names, plan.detector)
    samples: Dict[str, Any] = {"random": example}
    gen = torch.Generator().manual_seed(1)
    shape = example[0].shape if plan.detector else example.shape
    if plan.dynamic_batch:
        for batch in (1, 3):
            samples[f"random_batch{batch}"] = torch.randn(batch, *shape[1:], generator=gen).to(plan.torch_dtype)
    if plan.dynamic_size:  # the graph's H and W are not baked in
        other = [shape[-2] + 32, max(32, shape[-1] - 32)]
        samples["random_other_size"] = [torch.rand(3, *other, generator=gen)] if plan.detector else \
            torch.randn(*shape[:-2], *other, generator=gen).to(plan.torch_dtype)
    real = None if plan.detector or check_image is None else check_image.unsqueeze(0).to(plan.torch_dtype)
    if real is not None and real.shape[1] == shape[1] and (plan.dynamic_batch or real.shape[0] == shape[0]) \
            and (plan.dynamic_size or real.shape[-2:] == shape[-2:]):
        samples["real_image"] = real
    checks = {}
    for key, x in samples.items():
        with torch.no_grad():
            reference = _flatten_outputs(reference_model([i.float() for i in x] if plan.detector else x.float()))[1]
        got = artifact(x)
        if plan.detector:
            checks[key] = detection_output_diff(got, reference, plan.output_names, float(max(x[0].shape[-2:])),
                                         plan.tolerance)
        else:
            checks[key] = max(_rel_diff(g.float(), r) for g, r in zip(got, reference, strict=True))
    return checks
