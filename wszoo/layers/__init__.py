"""Shared WS building blocks: the one standardization function, WS convs/linears, norms, activations."""
from .norm_act import ACT_LAYERS, GroupNormAct, get_act_layer
from .standardize import DEFAULT_EPS, WS_STYLES, check_style, fan_in_of, standardize_weight
from .ws_conv import WSConv2d, WSConv2dSame, WSLinear, is_ws_layer

__all__ = [
    "ACT_LAYERS", "DEFAULT_EPS", "GroupNormAct", "WS_STYLES", "WSConv2d", "WSConv2dSame", "WSLinear",
    "check_style", "fan_in_of", "get_act_layer", "is_ws_layer", "standardize_weight",
]
