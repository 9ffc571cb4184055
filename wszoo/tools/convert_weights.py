"""``wszoo convert``: explicit, one-off conversions of original checkpoints into safetensors (a
``save_pretrained`` directory or a bare state dict). Not to be confused with
:func:`wszoo.convert_to_ws`, which retrofits WS layers onto a network (``wszoo/layers/retrofit.py``).

PyTorch pickles in a model's own key layout (the GN+WS authors' ``R-50-GN-WS.pth.tar`` files, saved
under DataParallel with a ``module.`` prefix, and mmdetection's ``resnet50_gn_ws-15beedd8.pth`` copies,
which wrap the weights in ``{'state_dict': ...}``): read with ``torch.load(weights_only=True)`` only.

DeepMind NFNets (``F{0..6}_haiku.npz``): Haiku parameters ``{module: {param: array}}`` with module names
such as ``NFNet/~/stem_conv0``, ``NFNet/~/nf_block_3/~/conv1b`` and ``.../squeeze_excite/~/linear_1``
(mapped onto the model by :func:`wszoo.models.nfnet.haiku_params_to_state_dict`, beside the
architecture). Accepted containers:

* a real ``.npz`` (``numpy.savez``) whose keys are ``"<module>/<param>"``; read with ``allow_pickle=False``;
* DeepMind's release files, which despite the name are (dill) pickles of that nested dict. They are read
  with a restricted unpickler that can build only dicts and numpy arrays, so a file that asks for any
  other class is refused instead of executed.
"""
import hashlib
import io
import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import numpy as np
import torch.nn as nn
from safetensors.torch import save_file

from ..checkpoint import CheckpointError, check_state_dict, non_finite_tensors, read_torch_checkpoint
from ..errors import Fix, UsageError
from ..factory import create_model
from ..files import atomic_path, check_writable_parent
from ..hub import CONFIG_NAME, PretrainedWeightsError, is_saved_model_dir, read_saved_config, save_pretrained
from ..models.nfnet import haiku_params_to_state_dict
from ..provenance import METADATA_KEY, published_weights, record_weights, saved_weights
from ..registry import split_model_name
from ..saved_config import saved_model_args

__all__ = ["read_haiku_params", "convert_deepmind_nfnet", "convert_torch_checkpoint", "save_converted", "check_output"]

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


def check_output(out: str, force: bool = False) -> None:
    """Before any work: ``out``'s directory must exist, and an existing ``out`` is replaced only with
    ``force`` (a directory only when it holds a saved model: nothing unrelated is overwritten)."""
    out = os.fspath(out)
    check_writable_parent(out, "output")
    target = Path(out)
    if not target.exists():
        return
    if not force:
        raise UsageError(f"output {out!r} already exists{{force}}",
                         Fix("force", "True", phrase="; pass {} to replace it"))
    if target.is_dir() and any(target.iterdir()) and not is_saved_model_dir(out):
        raise ValueError(f"output {out!r} is a directory holding other files, not a saved model: refusing to "
                         "write into it even with --force")
    if out.endswith(".safetensors") and target.is_dir():
        raise ValueError(f"output {out!r} is a directory, not a .safetensors file")


def save_converted(model: nn.Module, out: str, source: str) -> str:
    """``out`` ending in ``.safetensors``: the state dict alone (written atomically, refused if any tensor is
    NaN/Inf); otherwise a ``save_pretrained`` directory."""
    out = os.fspath(out)
    if out.endswith(".safetensors"):
        tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        bad = non_finite_tensors(tensors)
        if bad:
            raise CheckpointError(f"refusing to save non-finite values (NaN/Inf) in {', '.join(bad[:10])}")
        metadata = {"architecture": model.pretrained_cfg["architecture"], "source": os.path.basename(source),
                    METADATA_KEY: json.dumps(saved_weights(model))}
        with atomic_path(out) as tmp:
            save_file(tensors, tmp, metadata=metadata)
        return out
    return save_pretrained(model, out)


def _converted(model: nn.Module, src: str) -> None:
    """Record what the converted weights are: the tag's published checkpoint when ``src`` is that very file
    (its sha256 matches the tag's), else only the file they were converted from."""
    cfg = model.pretrained_cfg
    expected = cfg.get("url_sha256_prefix")
    if expected:
        with open(src, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        if digest.startswith(expected):
            record_weights(model, published_weights(cfg))
            return
    record_weights(model, {"kind": "converted", "file": os.path.basename(os.fspath(src))})


def _args_beside(src: str, model_name: str) -> Dict[str, Any]:
    """The arguments recorded in a ``config.json`` beside ``src`` for the same architecture (a timm
    ``save_for_hf`` folder: its class count and input channels), else none."""
    folder = os.path.dirname(os.path.abspath(os.fspath(src)))
    if not os.path.isfile(os.path.join(folder, CONFIG_NAME)):
        return {}
    try:
        config = read_saved_config(folder)
    except PretrainedWeightsError:
        return {}
    return saved_model_args(config) if config["architecture"] == split_model_name(model_name)[0] else {}


def convert_deepmind_nfnet(src: str, model_name: str, out: Optional[str] = None, force: bool = False,
                           **model_kwargs) -> nn.Module:
    """Convert an official ``F{i}_haiku.npz`` into ``model_name`` (e.g. ``dm_nfnet_f0``) and optionally save
    it (see :func:`save_converted`; an existing ``out`` only with ``force``). For DeepMind's exact numerics
    pass ``ws_style='deepmind', ws_eps=1e-4``."""
    if out is not None:
        check_output(out, force)
    model = create_model(model_name, **model_kwargs)
    state_dict = haiku_params_to_state_dict(read_haiku_params(src), model)
    model.load_state_dict(state_dict)
    _converted(model, src)
    if out is not None:
        save_converted(model, out, src)
    return model


def convert_torch_checkpoint(src: str, model_name: str, out: Optional[str] = None, force: bool = False,
                             **model_kwargs) -> nn.Module:
    """Load a pickle in ``model_name``'s own key layout (e.g. Qiao's GN+WS ResNets, or the ``pytorch_model.bin``
    of a timm ``save_for_hf`` folder, whose ``config.json`` gives the class count and input channels) strictly,
    and save it (an existing ``out`` only with ``force``)."""
    if out is not None:
        check_output(out, force)
    state_dict = read_torch_checkpoint(src)
    model = create_model(model_name, **{**_args_beside(src, model_name), **model_kwargs})
    check_state_dict(model, state_dict, source=f"checkpoint {os.fspath(src)!r}")
    model.load_state_dict(state_dict)
    _converted(model, src)
    if out is not None:
        save_converted(model, out, src)
    return model
