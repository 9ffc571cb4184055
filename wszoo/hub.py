"""Pretrained weights: download (Hugging Face Hub, or an original URL converted once), verify, load; and
the saved-model format, which this module alone writes and reads: a directory (or Hub repo) holding
``model.safetensors``, ``config.json`` (architecture, the model's arguments as it was at save time, its
pretrained cfg) and a ``README.md`` card, made by :func:`save_pretrained` and read back by
:func:`resolve_saved_model` for ``create_model('hf-hub:org/repo[@rev]')`` and ``'local-dir:/path'``.

Hub access goes through ``huggingface_hub.hf_hub_download``, which caches under ``HF_HUB_CACHE``.
``HF_ENDPOINT``, ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE`` are read when a download is made (not only
when huggingface_hub is imported), so setting them in a running process works.
"""
import hashlib
import json
import logging
import os
import socket
import tempfile
import urllib.request
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple
from urllib.parse import urlsplit

import torch
import torch.nn as nn
from huggingface_hub import constants as hf_constants
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from timm.models import adapt_input_conv

from .checkpoint import (
    CheckpointError,
    check_state_dict,
    non_finite_tensors,
    read_safetensors,
    read_torch_checkpoint,
    safetensors_metadata,
    strip_prefix,
)
from .errors import Fix, FixableError
from .provenance import (
    METADATA_KEY,
    TrainingRecord,
    loaded_weights,
    published_weights,
    record_weights,
    saved_weights,
    state_fingerprint,
)
from .saved_config import (
    CARD_NAME,
    CONFIG_NAME,
    TIMM_CFG_FIELDS,
    WEIGHTS_NAME,
    build_saved_config,
    saved_model_args,
    write_saved_files,
)

__all__ = [
    "PretrainedWeightsError", "CONFIG_NAME", "WEIGHTS_NAME", "CARD_NAME", "download_from_hub", "load_pretrained",
    "save_pretrained", "push_to_hub", "parse_hf_hub_name", "read_saved_config", "resolve_saved_model",
    "is_saved_model_dir", "saved_weights_file",
    "wszoo_cache_dir",
]

_logger = logging.getLogger("wszoo")



class PretrainedWeightsError(FixableError, RuntimeError):
    """Published weights that cannot be had: not cached while offline, missing on the Hub, bad download."""


def _truthy(value: Optional[str]) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _offline() -> bool:
    return _truthy(os.environ.get("HF_HUB_OFFLINE"))


def wszoo_cache_dir() -> Path:
    """Where original (non-Hub) checkpoints are converted to: ``$WSZOO_CACHE`` or ``~/.cache/wszoo``."""
    return Path(os.environ.get("WSZOO_CACHE") or Path.home() / ".cache" / "wszoo")


#: How long a connection to a download host may take before the host counts as unreachable.
CONNECT_TIMEOUT_S = 5.0


def _unreachable(url: str) -> Optional[str]:
    """Why ``url``'s host cannot be reached now (its name does not resolve, the connection is refused or
    times out), or ``None``. Asked before a download because huggingface_hub retries a dead network with
    1+2+4+8+8 s of backoff (~23 s) before it gives up; behind a proxy the proxy decides, so ``None``."""
    parts = urlsplit(url)
    host, scheme = parts.hostname, parts.scheme or "https"
    if not host or (urllib.request.getproxies().get(scheme) and not urllib.request.proxy_bypass(host)):
        return None
    port = parts.port or (443 if scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            return None
    except socket.gaierror as e:
        return f"{host} cannot be resolved: {e.strerror or e}"
    except OSError as e:  # refused, unreachable network, timed out
        return f"connecting to {host}:{port} failed: {e.strerror or e or type(e).__name__}"


def _hub_fix(repo_id: str, filename: str, revision: Optional[str], reason: str) -> PretrainedWeightsError:
    return PretrainedWeightsError(
        f"{filename} of {repo_id}{'@' + revision if revision else ''} is not in the local Hugging Face cache "
        f"({os.environ.get('HF_HUB_CACHE') or hf_constants.HF_HUB_CACHE}) and {reason}. Fetch it once where the Hub "
        f"is reachable (`hf download {repo_id} {filename}" + (f" --revision {revision}" if revision else "")
        + "`) and copy that cache here (or point HF_HUB_CACHE at it){checkpoint_path}.",
        Fix("checkpoint_path", "'<local .safetensors>'", cli_value="FILE", phrase=", or pass {}"),
    )


def download_from_hub(repo_id: str, filename: str, revision: Optional[str] = None) -> str:
    """``hf_hub_download`` with the environment read now and errors that say what to do next. A Hub whose
    host cannot be reached is not retried: the cache answers, or the error comes at once."""
    endpoint = os.environ.get("HF_ENDPOINT") or hf_constants.ENDPOINT
    why_not = None if _offline() else _unreachable(endpoint)
    try:
        return hf_hub_download(
            repo_id, filename, revision=revision,
            cache_dir=os.environ.get("HF_HUB_CACHE") or None,
            endpoint=os.environ.get("HF_ENDPOINT") or None,
            local_files_only=_offline() or why_not is not None,
        )
    except LocalEntryNotFoundError as e:
        reason = ("HF_HUB_OFFLINE is set" if _offline() else
                  f"the Hub cannot be reached ({why_not})" if why_not else "the Hub could not be reached")
        raise _hub_fix(repo_id, filename, revision, reason) from e
    except RepositoryNotFoundError as e:
        raise PretrainedWeightsError(f"Hub repository {repo_id!r} does not exist (or is private): {e}") from e
    except RevisionNotFoundError as e:
        raise PretrainedWeightsError(f"revision {revision!r} does not exist in {repo_id!r}") from e
    except EntryNotFoundError as e:
        raise PretrainedWeightsError(f"{repo_id!r} has no file {filename!r} at {revision or 'main'}") from e
    except HfHubHTTPError as e:
        raise PretrainedWeightsError(f"downloading {filename} from {repo_id} failed: {e}") from e


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _original_fix(cfg: Mapping[str, Any], target: Path, reason: str) -> PretrainedWeightsError:
    """How to get a pickle-published checkpoint by hand: the URL, and the conversion that puts it where
    ``pretrained`` finds it (or anywhere, then loaded as a checkpoint)."""
    url, name = cfg["url"], f"{cfg['architecture']}.{cfg['tag']}"
    return PretrainedWeightsError(
        f"{name} is published only as a PyTorch pickle, {url}, and it was not converted here yet; {reason}. "
        f"Download that file where the network is reachable and convert it once into the cache wszoo reads: "
        f"`wszoo convert {os.path.basename(url)} --source pth --model {name} -o {target}`{{checkpoint_path}}.",
        Fix("checkpoint_path", "'<DIR>/model.safetensors'", cli_value="DIR",
            phrase=" (or convert it with `-o DIR` anywhere and pass {})"),
    )


def _converted_original(cfg: Mapping[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Weights published only as a pickle at ``cfg['url']``: download once, check its sha256 prefix, read it
    with ``torch.load(weights_only=True)``, check it against ``model`` (the model being built), and keep it
    as a saved-model directory in :func:`wszoo_cache_dir`, read as safetensors from then on."""
    name = f"{cfg['architecture']}.{cfg['tag']}"
    target = wszoo_cache_dir() / name
    if (target / WEIGHTS_NAME).is_file():
        return strip_prefix(read_safetensors(str(target / WEIGHTS_NAME)))
    url = cfg["url"]
    target.parent.mkdir(parents=True, exist_ok=True)  # also where the error's `wszoo convert -o` writes
    why_not = "HF_HUB_OFFLINE is set" if _offline() else _unreachable(url)
    if why_not:
        raise _original_fix(cfg, target, why_not)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        raw = Path(tmp) / os.path.basename(url)
        try:
            torch.hub.download_url_to_file(url, str(raw), progress=True)
        except Exception as e:  # urllib raises several kinds
            raise _original_fix(cfg, target, f"downloading it failed: {e}") from e
        expected = cfg.get("url_sha256_prefix")
        digest = _sha256(raw)
        if expected and not digest.startswith(expected):
            raise PretrainedWeightsError(
                f"{url} has sha256 {digest[:16]}..., expected a prefix {expected}: refusing the download"
            )
        state_dict = read_torch_checkpoint(str(raw))
        _fit_to_model(model, cfg, dict(state_dict), source=f"{url} (converted)")  # refuse before caching
        weights = {"weights": published_weights(cfg), "sha256": state_fingerprint(state_dict)}
        config = build_saved_config(cfg, weights, num_classes=int(cfg.get("num_classes", 1000)),
                                    in_chans=int((cfg.get("input_size") or (3,))[0]),
                                    num_features=getattr(model, "num_features", None), model_args={})
        _write_saved_model(Path(tmp) / "converted", state_dict, config, type(model).__name__)
        # the weights land last: a half-done conversion is redone next time
        target.mkdir(exist_ok=True)
        for item in sorted((Path(tmp) / "converted").iterdir(), key=lambda p: p.name == WEIGHTS_NAME):
            os.replace(item, target / item.name)
    return state_dict


def _pretrained_state_dict(cfg: Mapping[str, Any], model: nn.Module
                           ) -> Tuple[Dict[str, torch.Tensor], str, Optional[str]]:
    """The published weights ``cfg`` points to (downloaded or converted if needed), where they came from (for
    messages), and the safetensors file they were read from (``None`` for a pickle converted just now)."""
    if cfg.get("hf_hub_id"):
        filename = cfg.get("hf_hub_filename") or WEIGHTS_NAME
        if not filename.endswith(".safetensors"):
            raise PretrainedWeightsError(f"{cfg['hf_hub_id']}: only safetensors are loaded, not {filename!r}")
        path = download_from_hub(cfg["hf_hub_id"], filename, cfg.get("revision"))
        return strip_prefix(read_safetensors(path)), f"checkpoint {path!r}", path
    if cfg.get("url"):
        return _converted_original(cfg, model), f"{cfg['url']} (converted)", None
    if cfg.get("package_dir"):  # weights shipped inside the wszoo package (the embedded default)
        from importlib import resources

        path = resources.files("wszoo").joinpath(cfg["package_dir"], WEIGHTS_NAME)
        if not path.is_file():
            raise PretrainedWeightsError(f"the packaged weights {cfg['package_dir']}/{WEIGHTS_NAME} are missing")
        return strip_prefix(read_safetensors(str(path))), f"checkpoint {str(path)!r}", str(path)
    raise PretrainedWeightsError(
        f"{cfg.get('architecture')!r} has no pretrained weights (tags: see wszoo.list_pretrained())"
    )


def _adapt_layout(model: nn.Module, state_dict: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """The family's own layout changes (e.g. a ViT's position grid resampled to the model's image size)."""
    if not hasattr(model, "adapt_state_dict"):
        return state_dict, []
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    state_dict = model.adapt_state_dict(state_dict)
    resized = sorted(k for k, v in state_dict.items() if k in shapes and tuple(v.shape) != shapes[k])
    return state_dict, [f"{key} resampled from {list(shapes[key])} to {list(state_dict[key].shape)}"
                        for key in resized]


def _fit_to_model(model: nn.Module, cfg: Mapping[str, Any], state_dict: Dict[str, torch.Tensor],
                  source: str) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Adapt a published state dict to ``model``'s classes and input channels, then check it in full; also
    returns what was changed (so the model does not claim to hold that checkpoint unchanged)."""
    state_dict, changes = _adapt_layout(model, state_dict)
    model_sd = model.state_dict()
    first_conv = f"{cfg.get('first_conv')}.weight"
    if first_conv in state_dict and first_conv in model_sd and \
            state_dict[first_conv].shape != model_sd[first_conv].shape:
        before = state_dict[first_conv].shape[1]
        state_dict[first_conv] = adapt_input_conv(model_sd[first_conv].shape[1], state_dict[first_conv])
        changes.append(f"{first_conv} adapted from {before} to {model_sd[first_conv].shape[1]} input channels")
        _logger.info("adapted %s from %d to %d input channels", first_conv, before, model_sd[first_conv].shape[1])
    prefix = f"{cfg.get('classifier')}."
    dropped = sorted(k for k in state_dict if cfg.get("classifier") and k.startswith(prefix)
                     and (k not in model_sd or state_dict[k].shape != model_sd[k].shape))
    if dropped:
        for key in dropped:
            del state_dict[key]
        for key in (k for k in model_sd if k.startswith(prefix)):  # the model keeps its fresh classifier
            state_dict.setdefault(key, model_sd[key])
        changes.append(f"a new {getattr(model, 'num_classes', '?')}-class classifier (random initialization, "
                       f"not trained) in place of the checkpoint's {cfg.get('num_classes')}-class one")
        _logger.info("not loading the checkpoint's classifier (%s): the model has %s classes, the checkpoint %s",
                     ", ".join(dropped), getattr(model, "num_classes", "?"), cfg.get("num_classes"))
    check_state_dict(model, state_dict, source=source, strict=True)
    return state_dict, changes


#: ``cfg['source']`` of a model read from a saved folder or repo (timm's names), rather than a registry tag
SAVED_SOURCES = ("hf-hub", "local-dir")


def load_pretrained(model: nn.Module, cfg: Mapping[str, Any], path: Optional[str] = None) -> nn.Module:
    """Load the weights of ``cfg`` (or the safetensors file ``path``) into ``model``, adapting to the model's
    classes and input channels, and record what they are (:mod:`wszoo.provenance`).

    * ``num_classes`` different from the checkpoint's: the classifier is left at its fresh init (logged).
    * ``in_chans`` != 3: the first conv is adapted as timm does (summed for 1 channel, repeated and
      scaled by 3/in_chans otherwise). Under WS the summed filter is re-standardized, so a 1-channel
      model matches the 3-channel one fed a replicated gray image only approximately: fine-tune it.

    Everything is checked before the model is touched.
    """
    explicit_file = path is not None
    if path is None:
        state_dict, source, path = _pretrained_state_dict(cfg, model)
    else:
        state_dict, source = strip_prefix(read_safetensors(path)), f"checkpoint {path!r}"
    if explicit_file or cfg.get("source") in SAVED_SOURCES:  # not a registry tag: the file says what it holds
        where = f"hf-hub:{cfg['hf_hub_id']}" if cfg.get("hf_hub_id") else str(path)
        description, _ = loaded_weights(safetensors_metadata(path).get(METADATA_KEY) if path else None,
                                        state_dict, where)
    else:
        description = published_weights(cfg)
    state_dict, changes = _fit_to_model(model, cfg, state_dict, source)
    model.load_state_dict(state_dict, strict=True)
    # (fingerprinted again as loaded: loading may adapt or cast what the file held)
    record_weights(model, description, changes)
    return model


def saved_weights_file(directory: str) -> str:
    """The ``model.safetensors`` of a saved folder; a folder holding only a pickle (timm's ``save_for_hf``
    writes ``pytorch_model.bin`` by default) gets the command that converts it."""
    folder = Path(directory)
    weights = folder / WEIGHTS_NAME
    if weights.is_file():
        return str(weights)
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pth", ".pt")) if folder.is_dir() \
        else []
    if not pickles:
        raise CheckpointError(f"{directory} has no {WEIGHTS_NAME}: not a saved model folder")
    try:
        arch = read_saved_config(directory)["architecture"]
    except PretrainedWeightsError:
        arch = "ARCH"
    found = folder / pickles[0]
    raise CheckpointError(
        f"{directory} holds {pickles[0]} (a PyTorch pickle, as timm's save_for_hf writes by default) but no "
        f"{WEIGHTS_NAME}, and wszoo loads only safetensors (unpickling can run code). Convert it once: "
        f"`wszoo convert {found} --source pth --model {arch} -o {str(folder).rstrip('/')}-safetensors`, "
        "then use that folder"
    )


# --- the saved-model format ---------------------------------------------------------------------------
def parse_hf_hub_name(name: str) -> Tuple[str, Optional[str]]:
    """``'hf-hub:org/repo@rev'`` -> ``('org/repo', 'rev')``."""
    spec = name[len("hf-hub:"):] if name.startswith("hf-hub:") else name
    repo, _, rev = spec.partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ValueError(f"expected 'hf-hub:org/repo[@revision]', got {name!r}")
    return repo, rev or None


def _parse_config(path: str, where: str) -> Dict[str, Any]:
    """A saved model's ``config.json``: readable JSON that names an architecture."""
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise PretrainedWeightsError(f"{where}: {CONFIG_NAME} is not readable JSON: {e}") from e
    if not isinstance(config, dict) or "architecture" not in config:
        raise PretrainedWeightsError(f"{where}: {CONFIG_NAME} names no 'architecture' (not a wszoo/timm repo?)")
    return config


def read_saved_config(directory: str) -> Dict[str, Any]:
    """``config.json`` of a :func:`save_pretrained` directory."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise PretrainedWeightsError(f"{directory} has no {CONFIG_NAME}: not a save_pretrained directory")
    return _parse_config(str(path), directory)


def resolve_saved_model(name: str) -> Tuple[Dict[str, Any], Dict[str, Any], Optional[str]]:
    """For ``'hf-hub:org/repo[@rev]'`` or ``'local-dir:/path'``: the pretrained cfg (with where the weights
    are), the model arguments to rebuild it with, and the local weights file (``local-dir:`` only; Hub
    weights are downloaded by :func:`load_pretrained`). Only timm's cfg fields are taken from the folder:
    what its weights are is read from the weights file itself when they are loaded."""
    if name.startswith("hf-hub:"):
        repo_id, revision = parse_hf_hub_name(name)
        config = _parse_config(download_from_hub(repo_id, CONFIG_NAME, revision), repo_id)
        source = {"hf_hub_id": repo_id, "hf_hub_filename": WEIGHTS_NAME, "revision": revision, "source": "hf-hub"}
        weights = None
    elif name.startswith("local-dir:"):
        directory = name[len("local-dir:"):]
        config = read_saved_config(directory)
        source = {"hf_hub_id": None, "url": None, "package_dir": None, "source": "local-dir"}
        weights = saved_weights_file(directory)
    else:
        raise ValueError(f"not a saved-model name (hf-hub:org/repo or local-dir:/path): {name!r}")
    args = saved_model_args(config)
    cfg = {k: v for k, v in (config.get("pretrained_cfg") or {}).items() if k in TIMM_CFG_FIELDS}
    cfg.update(architecture=config["architecture"], **source)
    paper = (config.get("wszoo") or {}).get("paper") or (config.get("pretrained_cfg") or {}).get("paper")
    if paper:
        cfg["paper"] = paper
    if "num_classes" in args:
        cfg["num_classes"] = args["num_classes"]
    return cfg, args, weights


def is_saved_model_dir(directory: str) -> bool:
    """True if ``directory`` holds a saved model (a ``config.json`` naming an architecture)."""
    try:
        read_saved_config(directory)
    except PretrainedWeightsError:
        return False
    return True


def _write_saved_model(out: Path, state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any],
                       class_name: str) -> None:
    """The three files, each written atomically (weights last: a reader that sees the new weights sees the new
    config). Refuses non-finite weights, and a non-empty directory that is not a saved model."""
    if out.is_dir() and any(out.iterdir()) and not is_saved_model_dir(str(out)):
        raise ValueError(f"{out} is not empty and holds no saved model ({CONFIG_NAME} naming an architecture): "
                         "refusing to write a model into it; choose a new or empty directory")
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    bad = non_finite_tensors(tensors)
    if bad:
        raise ValueError(f"refusing to save {config['architecture']}: non-finite values (NaN/Inf) in {len(bad)} "
                         f"tensor(s): {', '.join(bad[:10])}")
    write_saved_files(out, tensors, config, class_name)


def save_pretrained(model: nn.Module, save_dir: str, training: Optional[TrainingRecord] = None) -> str:
    """Write ``model.safetensors``, ``config.json`` and a ``README.md`` card into ``save_dir``: a directory
    ``create_model('local-dir:...')``, ``create_model('hf-hub:...')``, timm's ``create_model`` (for the
    architectures timm has) and :func:`push_to_hub` read.

    The config records the model as it is now: its class count (after ``reset_classifier`` too, 0
    included), input channels, global pooling, and the other arguments it was built with; and what its
    weights are (:mod:`wszoo.provenance`): a published tag and its accuracy only while the weights are that
    checkpoint unchanged. A training run passes ``training`` (:class:`wszoo.provenance.TrainingRecord`: the
    dataset, the accuracy it measured on these weights, the class names). Each file is written atomically;
    a non-empty directory that is not a saved model, and non-finite weights, are refused.
    """
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    if not cfg.get("architecture"):
        raise ValueError("save_pretrained needs a model made by wszoo.create_model (it has no pretrained_cfg)")
    in_chans = getattr(model, "in_chans", None) or int((cfg.get("input_size") or (3,))[0])
    config = build_saved_config(
        cfg, saved_weights(model, training), num_classes=getattr(model, "num_classes", None), in_chans=in_chans,
        num_features=getattr(model, "num_features", None), model_args=dict(getattr(model, "model_args", None) or {}),
        global_pool=getattr(model, "global_pool_type", None), training=training)
    _write_saved_model(Path(save_dir), model.state_dict(), config, type(model).__name__)
    return str(save_dir)


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
