"""Pretrained weights: download (Hugging Face Hub, or an original URL converted once), verify, load;
and the way back: ``save_pretrained``, ``push_to_hub``, and rebuilding from ``hf-hub:org/repo[@rev]``.

Hub access goes through ``huggingface_hub.hf_hub_download``, which caches under ``HF_HUB_CACHE``.
``HF_ENDPOINT``, ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE`` are read when a download is made (not only
when huggingface_hub is imported), so setting them in a running process works.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
import torch.nn as nn
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors.torch import save_file
from timm.models import adapt_input_conv

from .checkpoint import check_state_dict, load_checkpoint, read_safetensors, strip_prefix

__all__ = [
    "PretrainedWeightsError", "download_from_hub", "pretrained_weights_file", "load_pretrained",
    "save_pretrained", "push_to_hub", "parse_hf_hub_name", "read_local_config", "load_checkpoint", "wszoo_cache_dir",
]

_logger = logging.getLogger("wszoo")
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class PretrainedWeightsError(RuntimeError):
    """Published weights that cannot be had: not cached while offline, missing on the Hub, bad download."""


def _truthy(value: Optional[str]) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _offline() -> bool:
    return _truthy(os.environ.get("HF_HUB_OFFLINE"))


def wszoo_cache_dir() -> Path:
    """Where original (non-Hub) checkpoints are converted to: ``$WSZOO_CACHE`` or ``~/.cache/wszoo``."""
    return Path(os.environ.get("WSZOO_CACHE") or Path.home() / ".cache" / "wszoo")


def download_from_hub(repo_id: str, filename: str, revision: Optional[str] = None) -> str:
    """``hf_hub_download`` with the environment read now and errors that say what to do next."""
    where = f"{repo_id}@{revision}" if revision else repo_id
    try:
        return hf_hub_download(
            repo_id, filename, revision=revision,
            cache_dir=os.environ.get("HF_HUB_CACHE") or None,
            endpoint=os.environ.get("HF_ENDPOINT") or None,
            local_files_only=_offline(),
        )
    except LocalEntryNotFoundError as e:
        reason = "HF_HUB_OFFLINE is set" if _offline() else "the Hub could not be reached"
        raise PretrainedWeightsError(
            f"{filename} of {where} is not in the local Hugging Face cache and {reason}. Fetch it once where the "
            f"Hub is reachable (`hf download {repo_id} {filename}`"
            + (f" --revision {revision}" if revision else "")
            + ") and copy the cache (HF_HUB_CACHE) here, or pass checkpoint_path=<local .safetensors>."
        ) from e
    except RepositoryNotFoundError as e:
        raise PretrainedWeightsError(f"Hub repository {repo_id!r} does not exist (or is private): {e}") from e
    except RevisionNotFoundError as e:
        raise PretrainedWeightsError(f"revision {revision!r} does not exist in {repo_id!r}") from e
    except EntryNotFoundError as e:
        raise PretrainedWeightsError(f"{repo_id!r} has no file {filename!r} at {revision or 'main'}") from e
    except HfHubHTTPError as e:
        raise PretrainedWeightsError(f"downloading {filename} from {where} failed: {e}") from e


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _converted_original(cfg: Mapping[str, Any]) -> str:
    """Weights published only as a pickle at ``cfg['url']``: download once, check its sha256 prefix, convert
    with ``torch.load(weights_only=True)`` to a safetensors directory in :func:`wszoo_cache_dir`, and
    load that from then on."""
    from .convert import convert_torch_checkpoint

    name = f"{cfg['architecture']}.{cfg['tag']}"
    target = wszoo_cache_dir() / name / WEIGHTS_NAME
    if target.is_file():
        return str(target)
    url = cfg["url"]
    if _offline():
        raise PretrainedWeightsError(
            f"{name} is published as a PyTorch pickle at {url} and has not been converted here yet, and "
            f"HF_HUB_OFFLINE is set. Download that file elsewhere and run `wszoo convert FILE --source pth "
            f"--model {cfg['architecture']} -o {target.parent}`."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        raw = Path(tmp) / os.path.basename(url)
        try:
            torch.hub.download_url_to_file(url, str(raw), progress=True)
        except Exception as e:  # urllib raises several kinds
            raise PretrainedWeightsError(f"downloading {url} for {name} failed: {e}") from e
        expected = cfg.get("url_sha256_prefix")
        digest = _sha256(raw)
        if expected and not digest.startswith(expected):
            raise PretrainedWeightsError(
                f"{url} has sha256 {digest[:16]}..., expected a prefix {expected}: refusing the download"
            )
        model = convert_torch_checkpoint(str(raw), name, num_classes=int(cfg.get("num_classes", 1000)))
        save_pretrained(model, str(Path(tmp) / "converted"))
        for item in (Path(tmp) / "converted").iterdir():
            os.replace(item, target.parent / item.name)  # weights land last: a half-done conversion is redone
    return str(target)


def pretrained_weights_file(cfg: Mapping[str, Any]) -> str:
    """Local path of the safetensors weights a pretrained cfg points to (downloading/converting if needed)."""
    if cfg.get("hf_hub_id"):
        filename = cfg.get("hf_hub_filename") or WEIGHTS_NAME
        if not filename.endswith(".safetensors"):
            raise PretrainedWeightsError(f"{cfg['hf_hub_id']}: only safetensors are loaded, not {filename!r}")
        return download_from_hub(cfg["hf_hub_id"], filename, cfg.get("revision"))
    if cfg.get("url"):
        return _converted_original(cfg)
    if cfg.get("package_dir"):  # weights shipped inside the wszoo package (the embedded default)
        from importlib import resources

        path = resources.files("wszoo").joinpath(cfg["package_dir"], WEIGHTS_NAME)
        if not path.is_file():
            raise PretrainedWeightsError(f"the packaged weights {cfg['package_dir']}/{WEIGHTS_NAME} are missing")
        return str(path)
    raise PretrainedWeightsError(
        f"{cfg.get('architecture')!r} has no pretrained weights (tags: see wszoo.list_pretrained())"
    )


def _classifier_keys(model: nn.Module, cfg: Mapping[str, Any]) -> Tuple[str, ...]:
    name = cfg.get("classifier")
    return tuple(k for k in model.state_dict() if name and k.startswith(f"{name}."))


def load_pretrained(model: nn.Module, cfg: Mapping[str, Any], path: Optional[str] = None) -> nn.Module:
    """Load the weights of ``cfg`` into ``model``, adapting to the model's classes and input channels.

    * ``num_classes`` different from the checkpoint's: the classifier is left at its fresh init (logged).
    * ``in_chans`` != 3: the first conv is adapted as timm does (summed for 1 channel, repeated and
      scaled by 3/in_chans otherwise). Under WS the summed filter is re-standardized, so a 1-channel
      model matches the 3-channel one fed a replicated gray image only approximately: fine-tune it.

    Everything is checked before the model is touched.
    """
    path = path or pretrained_weights_file(cfg)
    state_dict = strip_prefix(read_safetensors(path))
    model_sd = model.state_dict()
    first_conv = f"{cfg.get('first_conv')}.weight"
    if first_conv in state_dict and first_conv in model_sd and state_dict[first_conv].shape != model_sd[first_conv].shape:
        state_dict[first_conv] = adapt_input_conv(model_sd[first_conv].shape[1], state_dict[first_conv])
        _logger.info("adapted %s from %d to %d input channels", first_conv, 3, model_sd[first_conv].shape[1])
    classifier = _classifier_keys(model, cfg)
    prefix = f"{cfg.get('classifier')}."
    dropped = sorted(k for k in state_dict if k.startswith(prefix)
                     and (k not in model_sd or state_dict[k].shape != model_sd[k].shape))
    if dropped:
        for key in dropped:
            del state_dict[key]
        for key in classifier:  # the model keeps its freshly initialised classifier
            state_dict.setdefault(key, model_sd[key])
        _logger.info("not loading the checkpoint's classifier (%s): the model has %s classes, the checkpoint %s",
                     ", ".join(dropped), getattr(model, "num_classes", "?"), cfg.get("num_classes"))
    check_state_dict(model, state_dict, source=f"checkpoint {path!r}", strict=True)
    model.load_state_dict(state_dict, strict=True)
    return model


def read_local_config(directory: str) -> Dict[str, Any]:
    """config.json of a ``save_pretrained`` directory (for ``create_model('local-dir:...')``)."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise PretrainedWeightsError(f"{directory} has no {CONFIG_NAME}: not a save_pretrained directory")
    return _parse_config(str(path), directory)


def parse_hf_hub_name(name: str) -> Tuple[str, Optional[str]]:
    """``'hf-hub:org/repo@rev'`` -> ``('org/repo', 'rev')``."""
    spec = name[len("hf-hub:"):] if name.startswith("hf-hub:") else name
    repo, _, rev = spec.partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ValueError(f"expected 'hf-hub:org/repo[@revision]', got {name!r}")
    return repo, rev or None


def _parse_config(path: str, where: str) -> Dict[str, Any]:
    """A save_pretrained ``config.json``: readable JSON that names an architecture."""
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise PretrainedWeightsError(f"{where}: {CONFIG_NAME} is not readable JSON: {e}") from e
    if not isinstance(config, dict) or "architecture" not in config:
        raise PretrainedWeightsError(f"{where}: {CONFIG_NAME} names no 'architecture' (not a wszoo/timm repo?)")
    return config


def read_hub_config(repo_id: str, revision: Optional[str]) -> Dict[str, Any]:
    """config.json of a Hub repo written by :func:`save_pretrained`."""
    return _parse_config(download_from_hub(repo_id, CONFIG_NAME, revision), repo_id)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)


def _model_card(model: nn.Module, config: Mapping[str, Any]) -> str:
    cfg = config["pretrained_cfg"]
    params = sum(p.numel() for p in model.parameters())
    lines = [
        "---", "library_name: wszoo", "tags:", "- image-classification", "- weight-standardization",
        f"license: {cfg.get('license', 'other')}", "---", "",
        f"# {config['architecture']}" + (f".{cfg['tag']}" if cfg.get("tag") else ""), "",
        f"A `{type(model).__name__}` saved by wszoo ({params / 1e6:.1f}M parameters, "
        f"{config.get('num_classes')} classes).", "",
        "```python", "import wszoo", "model = wszoo.create_model('hf-hub:<this repo>')", "```", "",
        f"Preprocessing: input {list(cfg.get('input_size', []))}, crop_pct {cfg.get('crop_pct')}, "
        f"{cfg.get('interpolation')} interpolation, mean {list(cfg.get('mean', []))}, std {list(cfg.get('std', []))}.",
    ]
    if cfg.get("paper"):
        lines += ["", f"Paper: {cfg['paper']}"]
    if cfg.get("top1") is not None:
        lines += ["", f"Published ImageNet top-1: {cfg['top1']} ({cfg.get('top1_source', 'source not given')})."]
    return "\n".join(lines) + "\n"


def save_pretrained(model: nn.Module, save_dir: str) -> str:
    """Write ``model.safetensors``, ``config.json`` (architecture, model args, pretrained cfg) and a README
    model card into ``save_dir``: a directory ``create_model('hf-hub:...')`` and ``push_to_hub`` read."""
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    if not cfg.get("architecture"):
        raise ValueError("save_pretrained needs a model made by wszoo.create_model (it has no pretrained_cfg)")
    out = Path(save_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "architecture": cfg["architecture"],
        "num_classes": getattr(model, "num_classes", None),
        "num_features": getattr(model, "num_features", None),
        "model_args": _jsonable(dict(getattr(model, "model_args", {}) or {})),
        "pretrained_cfg": _jsonable(cfg),
    }
    state_dict = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state_dict, str(out / WEIGHTS_NAME), metadata={"format": "pt", "architecture": cfg["architecture"]})
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (out / "README.md").write_text(_model_card(model, config), encoding="utf-8")
    return str(out)


def push_to_hub(model: nn.Module, repo_id: str, *, token: Optional[str] = None, private: bool = False,
                revision: Optional[str] = None, commit_message: str = "Add wszoo model") -> str:
    """``save_pretrained`` into a temporary directory and upload it as one commit; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp)
        info = api.upload_folder(repo_id=repo_id, folder_path=tmp, revision=revision, commit_message=commit_message)
    return str(getattr(info, "commit_url", info))
