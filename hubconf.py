"""torch.hub entry points for wszoo: one per registered architecture.

    model = torch.hub.load("<repo or local dir>", "resnetv2_50x1_bit", source="local", pretrained=True)

Each entry point takes ``pretrained`` (load the architecture's default published weights) and passes
every other keyword to :func:`wszoo.create_model` (``num_classes``, ``in_chans``, ``features_only`` ...).
"""
dependencies = ["torch", "torchvision", "timm", "huggingface_hub", "safetensors"]

import wszoo as _wszoo  # noqa: E402  (torch.hub reads `dependencies` first)


def _entry_point(name: str):
    def entry(pretrained: bool = False, **kwargs):
        return _wszoo.create_model(name, pretrained=pretrained, **kwargs)

    cfg = _wszoo.get_pretrained_cfg(name)
    tag = f"{name}.{cfg['tag']}" if cfg["tag"] else "none published"
    family_doc = (_wszoo.registry._entrypoints[name].__doc__ or name).strip().splitlines()[0]
    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = (
        f"{family_doc}\n\n"
        f"Args:\n"
        f"    pretrained: load the default published weights ({tag}).\n"
        f"    **kwargs: passed to wszoo.create_model (num_classes, in_chans, drop_path_rate, ...).\n\n"
        f"Preprocessing: input {cfg['input_size']}, crop_pct {cfg.get('crop_pct')}, {cfg.get('interpolation')}, "
        f"mean {cfg.get('mean')}, std {cfg.get('std')}."
    )
    return entry


for _name in _wszoo.list_models():
    globals()[_name] = _entry_point(_name)
del _name
