"""Reading checkpoints and loading them into models: everything is checked before the model is touched.

Pickled checkpoints (``.pth``, ``.bin``, ...) can run arbitrary code when loaded and are refused by
:func:`read_safetensors` / :func:`load_checkpoint`; :func:`read_torch_checkpoint` reads them with
``torch.load(weights_only=True)`` for the explicit, one-off conversions (``wszoo convert``).
"""
import json
import os
import warnings
from typing import Dict, Iterable, List, Mapping, Optional

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from .errors import Fix, FixableError

__all__ = ["CheckpointError", "read_safetensors", "read_torch_checkpoint", "check_state_dict", "load_checkpoint",
           "strip_prefix", "non_finite_tensors", "saved_architecture", "safetensors_metadata",
           "require_same_architecture"]

_PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".pkl", ".pickle", ".tar", ".ckpt")
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default (zip) format


class CheckpointError(FixableError, ValueError):
    """A checkpoint that cannot be loaded as asked; the model it was meant for is left unchanged."""


def _looks_pickled(path: str) -> bool:
    if path.lower().endswith(_PICKLE_SUFFIXES):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    if len(head) == 9 and head[8:9] == b"{":  # safetensors: u64 header length, then the JSON header
        return False
    # zip archive, or a pickle's PROTO opcode (0x80) followed by a protocol number 2..5
    return head.startswith(_ZIP_MAGIC) or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def read_safetensors(path: str) -> Dict[str, torch.Tensor]:
    """Read a safetensors file to CPU tensors, with errors that name the file and the problem."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} is not a file")
    if _looks_pickled(path):
        raise CheckpointError(
            f"checkpoint {path!r} looks like a pickle (torch.save) file; wszoo loads only safetensors, because "
            "unpickling can run code. Convert it once with `wszoo convert FILE --source pth --model ARCH -o DIR` "
            "(which reads it with torch.load(weights_only=True))"
        )
    if os.path.getsize(path) < 8:
        raise CheckpointError(f"checkpoint {path!r} is empty or truncated ({os.path.getsize(path)} bytes)")
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {path!r} is not a readable safetensors file: {e}") from e


#: What ``wszoo convert --source pth`` takes, said wherever a file is not that.
_CONVERT_READS = ("`wszoo convert --source pth` reads torch.save files (zip or legacy pickle) of tensors: a state "
                  "dict, alone or under 'state_dict' or 'model'")


def _why_not_weights_only(path: str, error: Exception) -> str:
    """The one fact that matters from ``torch.load``'s error: whose advice (load with weights_only=False) is
    not for a file of unknown origin, and is left out."""
    with open(path, "rb") as f:
        head = f.read(2)
    if not (head.startswith(_ZIP_MAGIC[:2]) or (len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5)):
        return "not a PyTorch checkpoint (neither torch.save's zip archive nor a pickle)"
    text = str(error)
    if "GLOBAL " in text:  # "Unsupported global: GLOBAL pkg.Class was not an allowed global ..."
        name = text.split("GLOBAL ", 1)[1].split()[0]
        return (f"a pickle that asks to build {name}, which weights-only loading refuses (it would run code "
                "from the file)")
    detail = text.split("WeightsUnpickler error:", 1)[-1].strip().split("\n")[0].strip() \
        if "WeightsUnpickler error:" in text else text.strip().split(". ")[0]
    return f"not readable as a weights-only PyTorch checkpoint ({detail[:200]})"


def read_torch_checkpoint(path: str) -> Dict[str, torch.Tensor]:
    """The tensors of a ``torch.save`` checkpoint, via ``torch.load(weights_only=True)`` (no code runs);
    unwraps ``{'state_dict': ...}`` / ``{'model': ...}`` and drops non-tensor entries."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path!r} does not exist or is not a file")
    try:
        with warnings.catch_warnings():  # torch's note on the pickle protocol is no news to the reader
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types
        raise CheckpointError(f"{path!r} is {_why_not_weights_only(path, e)}; {_CONVERT_READS}") from e
    for key in ("state_dict", "model"):
        if isinstance(data, Mapping) and isinstance(data.get(key), Mapping):
            data = data[key]
            break
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{path!r} holds a {type(data).__name__}, not a state dict; {_CONVERT_READS}")
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path!r} holds no tensors; {_CONVERT_READS}")
    return strip_prefix(tensors)


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str = "module.") -> Dict[str, torch.Tensor]:
    """Drop ``prefix`` (DataParallel/DDP's ``module.``) when every key carries it."""
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def _listing(keys: Iterable[str], limit: int = 10) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def non_finite_tensors(tensors: Mapping[str, torch.Tensor]) -> List[str]:
    """Names of the floating-point tensors holding a NaN or an infinity (weights no model should run with)."""
    return sorted(k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))


def safetensors_metadata(path: str) -> Dict[str, str]:
    """The string metadata of a safetensors file's header (``{}`` when it has none or cannot be read)."""
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError):
        return {}


def saved_architecture(path: str) -> Optional[str]:
    """The architecture a safetensors file says it was saved from: wszoo writes it in the file's metadata, and
    a ``save_pretrained`` directory's ``config.json`` beside the file says it too. ``None`` when neither does."""
    metadata = safetensors_metadata(path)
    if metadata.get("architecture"):
        return metadata["architecture"]
    config = os.path.join(os.path.dirname(os.fspath(path)), "config.json")
    try:
        with open(config, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data.get("architecture") if isinstance(data, dict) else None


def require_same_architecture(model: nn.Module, path: str) -> None:
    """Refuse a checkpoint saved from another architecture: WS and plain twins (``resnet_mini_gn`` vs
    ``resnet_mini_gn_ws``) share every key and shape, so only the recorded name tells them apart."""
    ours = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    theirs = saved_architecture(path)
    if ours and theirs and ours != theirs:
        raise CheckpointError(
            f"checkpoint {os.fspath(path)!r} was saved from {theirs}, not {ours}{{model_name}}{{check_architecture}}",
            Fix("model_name", repr(theirs), phrase=": load it with {}", call="create_model"),
            Fix("check_architecture", "False", phrase=", or pass {} if the mismatch is deliberate",
                call="load_checkpoint"),
        )


def check_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "state dict", strict: bool = True
) -> None:
    """Raise one :class:`CheckpointError` naming every missing/unexpected key, shape mismatch and tensor with
    non-finite values."""
    expected = model.state_dict()
    problems: List[str] = []
    missing = set(expected) - set(state_dict)
    unexpected = set(state_dict) - set(expected)
    if strict and missing:
        problems.append(f"missing keys ({len(missing)}): {_listing(missing)}")
    if strict and unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
    bad_shapes = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    if bad_shapes:
        problems.append(f"shape mismatches ({len(bad_shapes)}): " + "; ".join(bad_shapes[:10]))
    not_float = [k for k, v in state_dict.items()
                 if k in expected and v.is_floating_point() != expected[k].is_floating_point()]
    if not_float:
        problems.append(f"dtype kind mismatches: {_listing(not_float)}")
    non_finite = non_finite_tensors(state_dict)
    if non_finite:
        problems.append(f"non-finite values (NaN/Inf) in {len(non_finite)} tensor(s): {_listing(non_finite)}")
    if problems:
        raise CheckpointError(f"{source} does not fit {type(model).__name__}: " + " | ".join(problems))


def load_checkpoint(model: nn.Module, path: str, strict: bool = True, prefix: Optional[str] = "module.",
                    check_architecture: bool = True) -> nn.Module:
    """Load a safetensors state dict into ``model`` after checking the whole file against it.

    Args:
        model: the model to fill in place.
        path: a ``.safetensors`` file (pickles are refused, see module docstring).
        strict: require exactly the model's keys; with ``False`` missing/extra keys are allowed but shapes
            must still agree.
        prefix: a prefix to strip when every key has it (``module.`` from DataParallel); ``None`` keeps keys.
        check_architecture: refuse a file whose metadata names another architecture than
            ``model.pretrained_cfg['architecture']`` (see :func:`require_same_architecture`).

    Returns:
        ``model``. On any problem a :class:`CheckpointError` names the file and the offending keys, and the
        model is exactly as it was.
    """
    state_dict = read_safetensors(path)
    if check_architecture:
        require_same_architecture(model, path)
    if prefix:
        state_dict = strip_prefix(state_dict, prefix)
    check_state_dict(model, state_dict, source=f"checkpoint {os.fspath(path)!r}", strict=strict)
    model.load_state_dict(state_dict, strict=strict)
    return model
