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


def fasterrcnn_gn_ws(pretrained: bool = False, backbone: str = "resnet50_gn_ws", num_classes: int = 91, **kwargs):
    """Faster R-CNN with a wszoo backbone and a GN+WS FPN and 4conv1fc box head (torchvision's detector).

    Args:
        pretrained: load the backbone's published weights (no detector weights are published).
        backbone: any registered wszoo model name.
        num_classes: detector classes including background.
        **kwargs: passed to wszoo.detection.build_detector / torchvision's FasterRCNN.
    """
    from wszoo.detection import build_detector

    return build_detector("fasterrcnn", backbone, num_classes, pretrained_backbone=pretrained, **kwargs)


def maskrcnn_gn_ws(pretrained: bool = False, backbone: str = "resnet50_gn_ws", num_classes: int = 91, **kwargs):
    """Mask R-CNN with a wszoo backbone, GN+WS FPN, box head and mask head.

    Args:
        pretrained: load the backbone's published weights (no detector weights are published).
        backbone: any registered wszoo model name.
        num_classes: detector classes including background.
        **kwargs: passed to wszoo.detection.build_detector / torchvision's MaskRCNN.
    """
    from wszoo.detection import build_detector

    return build_detector("maskrcnn", backbone, num_classes, pretrained_backbone=pretrained, **kwargs)


def retinanet_gn_ws(pretrained: bool = False, backbone: str = "resnet50_gn_ws", num_classes: int = 91, **kwargs):
    """RetinaNet with a wszoo backbone, a GN+WS FPN (P3-P7) and GN+WS classification/regression towers.

    Args:
        pretrained: load the backbone's published weights (no detector weights are published).
        backbone: any registered wszoo model name.
        num_classes: detector classes.
        **kwargs: passed to wszoo.detection.build_detector / torchvision's RetinaNet.
    """
    from wszoo.detection import build_detector

    return build_detector("retinanet", backbone, num_classes, pretrained_backbone=pretrained, **kwargs)


def deeplabv3_gn_ws(pretrained: bool = False, backbone: str = "resnet50_gn_ws", num_classes: int = 21, **kwargs):
    """DeepLabv3 with a dilated wszoo backbone (output stride 8 or 16) and a GN+WS ASPP head.

    Args:
        pretrained: load the backbone's published weights (no segmenter weights are published).
        backbone: any registered wszoo model name.
        num_classes: segmentation classes.
        **kwargs: passed to wszoo.detection.build_segmenter (output_stride, ...).
    """
    from wszoo.detection import build_segmenter

    return build_segmenter("deeplabv3", backbone, num_classes, pretrained_backbone=pretrained, **kwargs)
