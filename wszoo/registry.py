"""The model registry: architecture names, their entrypoints and families, and their pretrained tags with
each tag's config (read from ``configs/*.json``), with timm's naming (``arch`` or ``arch.tag``).

It imports nothing else of wszoo: model modules register themselves into it when ``wszoo.models`` is
imported (``import wszoo`` does that), and :mod:`wszoo.factory` builds models from what is here.
"""
import copy
import difflib
import fnmatch
import json
import re
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch.nn as nn

__all__ = [
    "register_model", "model_entrypoint", "list_models", "list_pretrained", "get_pretrained_cfg", "is_model",
    "model_family", "split_model_name", "family_configs", "normalize_cfg", "unknown_model_error",
    "UnknownModelError",
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
        return normalize_cfg(cfg)


def normalize_cfg(cfg: Dict[str, Any]) -> Dict[str, Any]:
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


def family_configs() -> List[Dict[str, Any]]:
    """Every ``configs/*.json`` (one per family), parsed, in file-name order."""
    families = []
    for entry in sorted(resources.files("wszoo.configs").iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".json"):
            try:
                families.append(json.loads(entry.read_text(encoding="utf-8")))
            except json.JSONDecodeError as e:
                raise RuntimeError(f"configs/{entry.name} is not valid JSON: {e}") from e
    return families


def _load_arch_configs() -> Dict[str, _ArchConfig]:
    """Every architecture's defaults and tags, from ``{"defaults": {...}, "architectures": {arch: {...}}}``."""
    global _arch_cfgs
    if _arch_cfgs is None:
        cfgs: Dict[str, _ArchConfig] = {}
        for data in family_configs():
            family_defaults = {"paper": data["paper"], **data.get("defaults", {})} if "paper" in data \
                else data.get("defaults", {})
            for arch, arch_data in data.get("architectures", {}).items():
                if arch in cfgs:
                    raise RuntimeError(f"architecture {arch!r} is configured twice (second time in family "
                                       f"{data.get('family')!r})")
                defaults = {**family_defaults, **arch_data.get("defaults", {})}
                cfgs[arch] = _ArchConfig(defaults, dict(arch_data.get("tags", {})))
        _arch_cfgs = cfgs
    return _arch_cfgs


def _natural_key(name: str) -> List[Union[int, str]]:
    """Sort ``resnet50`` before ``resnet101``: digit runs compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name.lower())]


def split_model_name(name: str) -> Tuple[str, str]:
    """``'arch.tag'`` -> ``('arch', 'tag')``; ``'arch'`` -> ``('arch', '')``."""
    arch, _, tag = name.partition(".")
    return arch, tag


def _arch_config(arch: str) -> _ArchConfig:
    return _load_arch_configs().get(arch) or _ArchConfig({})


def unknown_model_error(name: str) -> UnknownModelError:
    """The error for a name that is not registered, with the closest registered names."""
    known = sorted(_entrypoints) + list_pretrained()
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return UnknownModelError(f"Unknown model {name!r}.{hint} `wszoo list` shows all {len(_entrypoints)} models.")


def model_entrypoint(name: str) -> Callable[..., nn.Module]:
    """The function that builds architecture ``name`` (``arch`` or ``arch.tag``)."""
    arch, _ = split_model_name(name)
    if arch not in _entrypoints:
        raise unknown_model_error(name)
    return _entrypoints[arch]


def model_family(name: str) -> str:
    """The family (module of ``wszoo.models``) an architecture belongs to, e.g. ``'resnetv2_bit'``."""
    arch, _ = split_model_name(name)
    if arch not in _families:
        raise unknown_model_error(name)
    return _families[arch]


def is_model(name: str) -> bool:
    """True if ``name`` (``arch`` or ``arch.tag``) can be created."""
    arch, tag = split_model_name(name)
    return arch in _entrypoints and (not tag or tag in _arch_config(arch).tags)


def get_pretrained_cfg(name: str) -> Dict[str, Any]:
    """The pretrained config (preprocessing, classes, source) of ``arch.tag``, or of ``arch``'s default tag.

    For an architecture with no pretrained tag this is its preprocessing defaults, with ``tag`` ``''``.
    """
    arch, tag = split_model_name(name)
    if arch not in _entrypoints:
        raise unknown_model_error(name)
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
    names = list_pretrained() if pretrained else sorted(_entrypoints, key=_natural_key)
    patterns = [filter] if isinstance(filter, str) else list(filter)
    patterns = [p for p in patterns if p]
    if patterns:
        names = [n for n in names if any(fnmatch.fnmatch(n, p) for p in patterns)]
    return names


def list_pretrained(filter: str = "") -> List[str]:
    """Every ``arch.tag`` with a pretrained checkpoint, optionally filtered by a wildcard pattern."""
    out = sorted((f"{arch}.{tag}" for arch in _entrypoints for tag in _arch_config(arch).tags), key=_natural_key)
    return [n for n in out if fnmatch.fnmatch(n, filter)] if filter else out
