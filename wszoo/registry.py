"""The model registry: architecture entrypoints, their pretrained tags (read from ``configs/``), and
:func:`create_model`, with timm's naming (``arch`` or ``arch.tag``) and keyword conventions."""
from __future__ import annotations

import copy
import difflib
import fnmatch
import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch.nn as nn

__all__ = [
    "register_model", "create_model", "list_models", "list_pretrained", "get_pretrained_cfg",
    "is_model", "model_family", "split_model_name", "UnknownModelError",
]

_entrypoints: Dict[str, Callable[..., nn.Module]] = {}
_families: Dict[str, str] = {}
_arch_cfgs: Optional[Dict[str, "_ArchConfig"]] = None


class UnknownModelError(ValueError):
    """A model name or pretrained tag that is not registered."""


@dataclass
class _ArchConfig:
    """An architecture's preprocessing defaults and its pretrained tags (first tag = default tag)."""

    defaults: Dict[str, Any]
    tags: Dict[str, Dict[str, Any]] = field(default_factory=dict)

    def cfg(self, arch: str, tag: Optional[str]) -> Dict[str, Any]:
        cfg = copy.deepcopy(self.defaults)
        if tag:
            cfg.update(copy.deepcopy(self.tags[tag]))
        cfg["architecture"] = arch
        cfg["tag"] = tag or ""
        return _with_tuples(cfg)


def _with_tuples(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """JSON lists back to the tuples timm's data helpers compare against (in place; returns ``cfg``)."""
    for key in ("input_size", "test_input_size", "mean", "std", "pool_size"):
        if isinstance(cfg.get(key), list):
            cfg[key] = tuple(cfg[key])
    return cfg


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register a model entrypoint under its function name (must be unique)."""
    name = fn.__name__
    if name in _entrypoints and _entrypoints[name] is not fn:
        raise ValueError(f"model {name!r} is registered twice ({_families[name]} and {fn.__module__})")
    if "." in name:
        raise ValueError(f"model names may not contain '.', which separates the pretrained tag: {name!r}")
    _entrypoints[name] = fn
    _families[name] = fn.__module__.rsplit(".", 1)[-1]
    return fn


def _config_files() -> Iterable[Tuple[str, str]]:
    for entry in sorted(resources.files("wszoo.configs").iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".json"):
            yield entry.name, entry.read_text(encoding="utf-8")


def _load_arch_configs() -> Dict[str, _ArchConfig]:
    """Parse every ``configs/*.json`` once: ``{"defaults": {...}, "architectures": {arch: {...}}}``."""
    global _arch_cfgs
    if _arch_cfgs is None:
        cfgs: Dict[str, _ArchConfig] = {}
        for fname, text in _config_files():
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise RuntimeError(f"configs/{fname} is not valid JSON: {e}") from e
            family_defaults = {"paper": data["paper"], **data.get("defaults", {})} if "paper" in data else data.get("defaults", {})
            for arch, arch_data in data.get("architectures", {}).items():
                if arch in cfgs:
                    raise RuntimeError(f"architecture {arch!r} is configured twice (second time in configs/{fname})")
                defaults = {**family_defaults, **arch_data.get("defaults", {})}
                cfgs[arch] = _ArchConfig(defaults, dict(arch_data.get("tags", {})))
        _arch_cfgs = cfgs
    return _arch_cfgs


def _ensure_models_imported() -> None:
    from . import models  # noqa: F401  (importing the package registers every family)


def _natural_key(name: str) -> List[Union[int, str]]:
    """Sort ``resnet50`` before ``resnet101``: digit runs compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name.lower())]


def split_model_name(name: str) -> Tuple[str, str]:
    """``'arch.tag'`` -> ``('arch', 'tag')``; ``'arch'`` -> ``('arch', '')``."""
    arch, _, tag = name.partition(".")
    return arch, tag


def _arch_config(arch: str) -> _ArchConfig:
    return _load_arch_configs().get(arch) or _ArchConfig({})


def _unknown_model(name: str) -> UnknownModelError:
    known = sorted(_entrypoints) + list_pretrained()
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return UnknownModelError(f"Unknown model {name!r}.{hint} `wszoo list` shows all {len(_entrypoints)} models.")


def model_family(name: str) -> str:
    """The family (module of ``wszoo.models``) an architecture belongs to, e.g. ``'resnetv2_bit'``."""
    _ensure_models_imported()
    arch, _ = split_model_name(name)
    if arch not in _families:
        raise _unknown_model(name)
    return _families[arch]


def is_model(name: str) -> bool:
    """True if ``name`` (``arch`` or ``arch.tag``) can be created."""
    _ensure_models_imported()
    arch, tag = split_model_name(name)
    return arch in _entrypoints and (not tag or tag in _arch_config(arch).tags)


def get_pretrained_cfg(name: str) -> Dict[str, Any]:
    """The pretrained config (preprocessing, classes, source) of ``arch.tag``, or of ``arch``'s default tag.

    For an architecture with no pretrained tag this is its preprocessing defaults, with ``tag`` ``''``.
    """
    _ensure_models_imported()
    arch, tag = split_model_name(name)
    if arch not in _entrypoints:
        raise _unknown_model(name)
    arch_cfg = _arch_config(arch)
    if tag and tag not in arch_cfg.tags:
        tags = ", ".join(f"{arch}.{t}" for t in arch_cfg.tags) or "none"
        raise UnknownModelError(f"Unknown pretrained tag {tag!r} for {arch!r}; available: {tags}")
    if not tag and arch_cfg.tags:
        tag = next(iter(arch_cfg.tags))
    return arch_cfg.cfg(arch, tag)


def list_models(filter: Union[str, List[str]] = "", pretrained: bool = False) -> List[str]:
    """Registered names matching ``filter`` (shell wildcards, one pattern or a list).

    ``pretrained=True`` lists only names with weights, as ``arch.tag`` (every tag).
    """
    _ensure_models_imported()
    names = list_pretrained() if pretrained else sorted(_entrypoints, key=_natural_key)
    patterns = [filter] if isinstance(filter, str) else list(filter)
    patterns = [p for p in patterns if p]
    if patterns:
        names = [n for n in names if any(fnmatch.fnmatch(n, p) for p in patterns)]
    return names


def list_pretrained(filter: str = "") -> List[str]:
    """Every ``arch.tag`` with a pretrained checkpoint, optionally filtered by a wildcard pattern."""
    _ensure_models_imported()
    out = sorted((f"{arch}.{tag}" for arch in _entrypoints for tag in _arch_config(arch).tags), key=_natural_key)
    return [n for n in out if fnmatch.fnmatch(n, filter)] if filter else out


def create_model(
    model_name: str,
    pretrained: bool = False,
    num_classes: Optional[int] = None,
    in_chans: Optional[int] = None,
    checkpoint_path: Optional[str] = None,
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
    features_only: bool = False,
    out_indices: Optional[Sequence[int]] = None,
    frozen_stages: int = -1,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered model by name, timm-style.

    Args:
        model_name: ``arch``, ``arch.tag`` (the tag selects the pretrained config and its class count), or
            ``hf-hub:org/repo[@revision]`` for a repo written by :func:`wszoo.hub.save_pretrained`, or
            ``local-dir:/path`` for such a directory on disk.
        pretrained: load the published weights of the tag (``arch`` alone: its default tag) through
            :func:`wszoo.hub.load_pretrained`: safetensors from the Hub, or an original pickle converted once.
        num_classes: classifier outputs; defaults to the pretrained config's (1000 for ImageNet-1k). A
            different count keeps a fresh classifier and loads everything else.
        in_chans: input channels; default the config's (3, or 1 for the Fashion-MNIST models). Pretrained
            first convs are adapted as timm does.
        checkpoint_path: a local ``.safetensors`` state dict to load strictly (checked before any copy);
            it replaces ``pretrained``.
        drop_rate, drop_path_rate: classifier dropout and stochastic depth.
        features_only: return a feature extractor (timm's ``FeatureListNet``): ``model(x)`` is a list of
            maps, ``model.feature_info`` has ``channels()``, ``reduction()``, ``module_name()``.
        out_indices: which entries of ``feature_info`` to return (default all; ``(1, 2, 3, 4)`` gives
            strides 4, 8, 16, 32 on the ImageNet families).
        frozen_stages: -1 none; 0 the stem; k the stem and stages 1..k (``requires_grad=False``, frozen
            BatchNorms keep their statistics), as detection recipes use.
        **kwargs: passed to the architecture (e.g. ``global_pool``, ``output_stride``, ``ws_style``).

    The model gets ``pretrained_cfg`` (a dict usable by ``timm.data.resolve_data_config``).
    """
    _ensure_models_imported()
    repo_args: Dict[str, Any] = {}  # model args recorded by save_pretrained; explicit arguments win
    if model_name.startswith(("hf-hub:", "local-dir:")):
        from .hub import parse_hf_hub_name, read_hub_config, read_local_config

        if model_name.startswith("hf-hub:"):
            repo_id, revision = parse_hf_hub_name(model_name)
            config = read_hub_config(repo_id, revision)
            source = {"hf_hub_id": repo_id, "hf_hub_filename": "model.safetensors", "revision": revision}
        else:
            directory = model_name[len("local-dir:"):]
            config = read_local_config(directory)
            source = {"hf_hub_id": None, "url": None, "package_dir": None}
            checkpoint_path = checkpoint_path or (str(Path(directory) / "model.safetensors") if pretrained else None)
        arch = config["architecture"]
        if arch not in _entrypoints:
            raise _unknown_model(arch)
        cfg = {**config.get("pretrained_cfg", {}), "architecture": arch, **source}
        cfg.setdefault("num_classes", config.get("num_classes"))
        _with_tuples(cfg)
        repo_args = dict(config.get("model_args", {}))
    else:
        arch, _ = split_model_name(model_name)
        if arch not in _entrypoints:
            raise _unknown_model(model_name)
        cfg = get_pretrained_cfg(model_name)
    repo_classes, repo_chans = repo_args.pop("num_classes", None), repo_args.pop("in_chans", None)
    num_classes = int(num_classes if num_classes is not None else repo_classes or cfg.get("num_classes") or 1000)
    in_chans = int(in_chans if in_chans is not None else repo_chans or (cfg.get("input_size") or (3,))[0])
    kwargs = {**repo_args, **kwargs}
    model = _entrypoints[arch](
        num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate, drop_path_rate=drop_path_rate, **kwargs
    )
    model.pretrained_cfg = cfg
    model.default_cfg = cfg  # older timm helpers read this name
    model.model_args = {"num_classes": num_classes, "in_chans": in_chans, **kwargs}
    if pretrained and checkpoint_path is None:
        from .hub import load_pretrained

        load_pretrained(model, cfg)
    if checkpoint_path is not None:
        from .checkpoint import load_checkpoint

        load_checkpoint(model, checkpoint_path)
    if frozen_stages >= 0:
        from .models._helpers import freeze_stages

        freeze_stages(model, frozen_stages)
    if features_only:
        from timm.models import FeatureListNet

        indices = tuple(out_indices) if out_indices is not None else tuple(range(len(model.feature_info)))
        bad = [i for i in indices if not -len(model.feature_info) <= i < len(model.feature_info)]
        if bad:
            raise ValueError(f"out_indices {bad} out of range: {arch} has {len(model.feature_info)} feature levels")
        cfg, args = model.pretrained_cfg, model.model_args
        # nested feature modules ('stages.0', 'stem.conv') need timm's flattening of Sequential containers;
        # torchvision's layout ('layer1') must stay as it is
        nested = any("." in f["module"] for f in model.feature_info)
        model = FeatureListNet(model, out_indices=indices, flatten_sequential=nested)
        model.pretrained_cfg, model.default_cfg, model.model_args = cfg, cfg, args
    elif out_indices is not None:
        raise ValueError("out_indices is for features_only=True")
    return model
