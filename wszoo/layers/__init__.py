"""Shared WS building blocks: the one standardization function, WS convs/linears, norms, activations."""
from .activations import NONLIN_GAMMA, GammaAct, act_with_gamma
from .convert import convert_convs_to_ws
from .attention import EcaModule, SEModule, create_attn
from .norm_act import ACT_LAYERS, GroupNormAct, create_act, get_act_layer
from .standardize import DEFAULT_EPS, SCALED_STYLES, WS_STYLES, check_style, fan_in_of, standardize_weight
from .ws_conv import ScaledWSConv2d, ScaledWSConv2dSame, WSConv2d, WSConv2dSame, WSLinear, is_ws_layer

__all__ = [
    "ACT_LAYERS", "DEFAULT_EPS", "EcaModule", "SEModule", "convert_convs_to_ws", "create_act", "create_attn", "GammaAct", "GroupNormAct", "NONLIN_GAMMA", "SCALED_STYLES", "ScaledWSConv2d",
    "ScaledWSConv2dSame", "WS_STYLES", "WSConv2d", "WSConv2dSame", "WSLinear", "act_with_gamma", "check_style",
    "fan_in_of", "get_act_layer", "is_ws_layer", "standardize_weight",
]
