"""Explicit, one-off conversions of original checkpoints into wszoo state dicts (saved as safetensors).

PyTorch pickles in a model's own key layout (the GN+WS authors' ``R-50-GN-WS.pth.tar`` files, saved
under DataParallel with a ``module.`` prefix, and mmdetection's ``resnet50_gn_ws-15beedd8.pth`` copies,
which wrap the weights in ``{'state_dict': ...}``): read with ``torch.load(weights_only=True)`` only.

DeepMind NFNets (``F{0..6}_haiku.npz``): Haiku parameters ``{module: {param: array}}`` with module names
such as ``NFNet/~/stem_conv0``, ``NFNet/~/nf_block_3/~/conv1b`` and ``.../squeeze_excite/~/linear_1``,
HWIO kernels, ``(in, out)`` linear weights and ``(out,)`` gains. Accepted containers:

* a real ``.npz`` (``numpy.savez``) whose keys are ``"<module>/<param>"``; read with ``allow_pickle=False``;
* DeepMind's release files, which despite the name are (dill) pickles of that nested dict. They are read
  with a restricted unpickler that can build only dicts and numpy arrays, so a file that asks for any
  other class is refused instead of executed.
"""
from __future__ import annotations

import io
import os
import pickle
import re
import zipfile
from typing import Dict, Mapping, Optional

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import save_file

from .checkpoint import CheckpointError, check_state_dict, strip_prefix

__all__ = ["read_haiku_params", "haiku_nfnet_to_state_dict", "convert_deepmind_nfnet", "read_torch_checkpoint",
           "convert_torch_checkpoint", "save_converted"]

_SAFE_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("collections", "OrderedDict"), ("builtins", "dict"),
}


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles nested dicts of numpy arrays and refuses every other global (no code runs)."""

    def find_class(self, module: str, name: str):
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise CheckpointError(
            f"refusing to unpickle {module}.{name}: only dicts of numpy arrays are accepted. Re-save the "
            "parameters as a plain .npz (numpy.savez with '<module>/<param>' keys) and convert that."
        )


def _flatten(tree: Mapping, prefix: str = "") -> Dict[str, np.ndarray]:
    flat: Dict[str, np.ndarray] = {}
    for key, value in tree.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name))
        else:
            flat[name] = np.asarray(value)
    return flat


def read_haiku_params(path: str) -> Dict[str, np.ndarray]:
    """Read Haiku parameters as ``{"<module>/<param>": array}`` from a .npz or DeepMind's pickled file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path!r} does not exist or is not a file")
    if zipfile.is_zipfile(path):
        try:
            with np.load(path, allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
        except ValueError as e:
            raise CheckpointError(f"{path!r}: an .npz holding pickled objects is refused ({e})") from e
    with open(path, "rb") as f:
        raw = f.read()
    try:
        tree = _ArraysOnlyUnpickler(io.BytesIO(raw)).load()
    except CheckpointError:
        raise
    except Exception as e:  # truncated or foreign bytes: pickle raises many types
        raise CheckpointError(f"{path!r} is neither an .npz nor a pickled Haiku parameter dict: {e}") from e
    if not isinstance(tree, Mapping):
        raise CheckpointError(f"{path!r} holds a {type(tree).__name__}, not a Haiku parameter dict")
    return _flatten(tree)


_STEM = re.compile(r"^NFNet/~/stem_conv(\d)/(w|b|gain)$")
_BLOCK = re.compile(r"^NFNet/~/nf_block(?:_(\d+))?(?:/~/(.+))?/(\w+)$")
_HEAD = re.compile(r"^NFNet/~/(final_conv|linear)/(w|b|gain)$")
_BLOCK_PARTS = {  # DeepMind's names -> ours (timm's)
    "conv0": "conv1", "conv1": "conv2", "conv1b": "conv2b", "conv2": "conv3", "conv_shortcut": "downsample.conv",
    "squeeze_excite/~/linear": "attn_last.fc1", "squeeze_excite/~/linear_1": "attn_last.fc2",
}
_PARAMS = {"w": "weight", "b": "bias", "gain": "gain"}


def _to_torch(array: np.ndarray, param: str, conv: bool) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(array))
    if param == "w" and t.dim() == 4:  # HWIO -> OIHW
        t = t.permute(3, 2, 0, 1)
    elif param == "w" and t.dim() == 2:  # (in, out) -> (out, in), as a 1x1 conv when the target is one
        t = t.t()
        if conv:
            t = t[:, :, None, None]
    elif param == "gain":
        t = t.reshape(-1, 1, 1, 1)
    return t.contiguous().float()


def haiku_nfnet_to_state_dict(params: Mapping[str, np.ndarray], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Map DeepMind NFNet parameters onto ``model``'s keys (a ``dm_nfnet_*``), checking every key and shape."""
    block_names = [f"stages.{s}.{b}" for s, stage in enumerate(model.stages) for b in range(len(stage))]
    expected = model.state_dict()
    out: Dict[str, torch.Tensor] = {}
    unknown = []
    for key, array in params.items():
        target: Optional[str] = None
        param = key.rsplit("/", 1)[-1]
        if m := _STEM.match(key):
            target = f"stem.conv{int(m.group(1)) + 1}.{_PARAMS[m.group(2)]}"
        elif m := _HEAD.match(key):
            target = f"{'final_conv' if m.group(1) == 'final_conv' else 'head.fc'}.{_PARAMS[m.group(2)]}"
        elif m := _BLOCK.match(key):
            index = int(m.group(1) or 0)
            part, p = m.group(2), m.group(3)
            if index < len(block_names):
                if part is None and p == "skip_gain":
                    target = f"{block_names[index]}.skipinit_gain"
                elif part in _BLOCK_PARTS and p in _PARAMS:
                    target = f"{block_names[index]}.{_BLOCK_PARTS[part]}.{_PARAMS[p]}"
        if target is None or target not in expected:
            unknown.append(key)
            continue
        tensor = _to_torch(array, param, conv=expected[target].dim() == 4)
        out[target] = tensor.reshape(()) if expected[target].dim() == 0 else tensor
    if unknown:
        shown = ", ".join(sorted(unknown)[:10]) + (f" ... and {len(unknown) - 10} more" if len(unknown) > 10 else "")
        raise CheckpointError(f"Haiku parameters with no place in {type(model).__name__}: {shown}")
    check_state_dict(model, out, source="converted DeepMind parameters")
    return out


def save_converted(model: nn.Module, out: str, source: str) -> str:
    """``out`` ending in ``.safetensors``: the state dict alone; otherwise a ``save_pretrained`` directory."""
    out = os.fspath(out)
    if out.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out,
                  metadata={"architecture": model.pretrained_cfg["architecture"], "source": os.path.basename(source)})
        return out
    from .hub import save_pretrained

    return save_pretrained(model, out)


def convert_deepmind_nfnet(src: str, model_name: str, out: Optional[str] = None, **model_kwargs) -> nn.Module:
    """Convert an official ``F{i}_haiku.npz`` into ``model_name`` (e.g. ``dm_nfnet_f0``) and optionally save
    it (see :func:`save_converted`). For DeepMind's exact numerics pass ``ws_style='deepmind',
    std_conv_eps=1e-4``."""
    from .registry import create_model

    model = create_model(model_name, **model_kwargs)
    state_dict = haiku_nfnet_to_state_dict(read_haiku_params(src), model)
    model.load_state_dict(state_dict)
    if out is not None:
        save_converted(model, out, src)
    return model


def read_torch_checkpoint(path: str) -> Dict[str, torch.Tensor]:
    """The tensors of a ``torch.save`` checkpoint, via ``torch.load(weights_only=True)`` (no code runs);
    unwraps ``{'state_dict': ...}`` / ``{'model': ...}`` and drops non-tensor entries."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path!r} does not exist or is not a file")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types
        raise CheckpointError(f"{path!r} is not a loadable weights-only PyTorch checkpoint: {e}") from e
    for key in ("state_dict", "model"):
        if isinstance(data, Mapping) and isinstance(data.get(key), Mapping):
            data = data[key]
            break
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{path!r} holds a {type(data).__name__}, not a state dict")
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path!r} holds no tensors")
    return strip_prefix(tensors)


def convert_torch_checkpoint(src: str, model_name: str, out: Optional[str] = None, **model_kwargs) -> nn.Module:
    """Load a pickle in ``model_name``'s own key layout (e.g. Qiao's GN+WS ResNets) strictly, and save it."""
    from .registry import create_model

    model = create_model(model_name, **model_kwargs)
    state_dict = read_torch_checkpoint(src)
    check_state_dict(model, state_dict, source=f"checkpoint {os.fspath(src)!r}")
    model.load_state_dict(state_dict)
    if out is not None:
        save_converted(model, out, src)
    return model
