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
    family_doc = (_wszoo.registry.model_entrypoint(name).__doc__ or name).strip().splitlines()[0]
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



def _pipeline_entry(name: str, kind: str, num_classes: int, summary: str):
    def entry(pretrained: bool = False, backbone: str = "resnet50_gn_ws", num_classes: int = num_classes, **kwargs):
        from wszoo.detection import build_detector, build_segmenter

        if kind == "deeplabv3":
            return build_segmenter(kind, backbone, num_classes, pretrained_backbone=pretrained, **kwargs)
        return build_detector(kind, backbone, num_classes, pretrained_backbone=pretrained, **kwargs)

    entry.__name__ = entry.__qualname__ = name
    builder = "build_segmenter" if kind == "deeplabv3" else "build_detector"
    entry.__doc__ = (
        f"{summary}\n\n"
        f"Args:\n"
        f"    pretrained: start as the GN+WS recipe does: the backbone's published weights, stem and first stage\n"
        f"        frozen (no {kind} weights are published). False (the default, as torch.hub's): random weights.\n"
        f"    backbone: any registered wszoo model name.\n"
        f"    num_classes: output classes (default {num_classes}"
        + (", including background" if kind in ("fasterrcnn", "maskrcnn") else "") + ").\n"
        f"    **kwargs: passed to wszoo.detection.{builder} and torchvision's model."
    )
    return entry


fasterrcnn_gn_ws = _pipeline_entry(
    "fasterrcnn_gn_ws", "fasterrcnn", 91, "Faster R-CNN: wszoo backbone, GN+WS FPN and 4conv1fc box head.")
maskrcnn_gn_ws = _pipeline_entry(
    "maskrcnn_gn_ws", "maskrcnn", 91, "Mask R-CNN: wszoo backbone, GN+WS FPN, box head and mask head.")
retinanet_gn_ws = _pipeline_entry(
    "retinanet_gn_ws", "retinanet", 91, "RetinaNet: wszoo backbone, GN+WS FPN (P3-P7) and GN+WS towers.")
deeplabv3_gn_ws = _pipeline_entry(
    "deeplabv3_gn_ws", "deeplabv3", 21, "DeepLabv3: dilated wszoo backbone (output stride 8/16), GN+WS ASPP head.")
