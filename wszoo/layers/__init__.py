"""Shared WS building blocks: the one standardization function, WS convs/linears and their variants
(Centered WN, p4 group convolutions), norms (GroupNorm+act, Batch-Channel Norm), activations, and
``convert_to_ws`` for retrofitting WS onto existing networks."""
from .activations import NONLIN_GAMMA, GammaAct, act_with_gamma
from .affine_ws import (
    AffineWS,
    AffineWSConv1d,
    AffineWSConv2d,
    AffineWSConv2dSame,
    AffineWSConv3d,
    AffineWSLinear,
)
from .attention import EcaModule, SEModule, create_attn
from .bcn import BatchChannelNorm2d, EstimatedBatchNorm2d
from .grouped import LayerGroup, held_by_standardization, is_groupable, standardize_layers, standardize_weights
from .norm_act import ACT_LAYERS, GroupNormAct, create_act, get_act_layer
from .p4 import P4Conv2d, P4OrientationPool, P4WSConv2d, p4_filter_bank, rotate_p4
from .retrofit import (
    ConversionReport,
    WSPolicy,
    batchnorm_to_groupnorm,
    convert_convs_to_ws,
    convert_to_ws,
    replace_modules,
)
from .standardize import (
    DEFAULT_EPS,
    GAIN_STYLES,
    SCALED_STYLES,
    WS_STYLES,
    check_style,
    fan_in_of,
    standardize_weight,
)
from .ws_conv import (
    CWNConv2d,
    CWNLinear,
    MaxPool2dSame,
    ScaledWSConv2d,
    ScaledWSConv2dSame,
    WSConv2d,
    WSConv2dSame,
    WSLinear,
)
from .ws_conv_nd import ScaledWSConv1d, ScaledWSConv3d, WSConv1d, WSConv3d, WSConvTranspose2d
from .ws_layer import WSLayer, is_ws_layer

__all__ = [
    "ACT_LAYERS", "BatchChannelNorm2d", "CWNConv2d", "CWNLinear", "ConversionReport", "DEFAULT_EPS", "EcaModule",
    "EstimatedBatchNorm2d", "GAIN_STYLES", "GammaAct", "GroupNormAct", "NONLIN_GAMMA", "P4Conv2d",
    "P4OrientationPool", "P4WSConv2d", "SCALED_STYLES", "SEModule", "ScaledWSConv2d", "ScaledWSConv2dSame",
    "WSConv2d", "WSConv2dSame", "WSLayer", "WSLinear", "WSPolicy", "WS_STYLES", "act_with_gamma",
    "batchnorm_to_groupnorm",
    "check_style", "convert_convs_to_ws", "convert_to_ws", "create_act", "create_attn", "fan_in_of",
    "get_act_layer", "is_ws_layer", "p4_filter_bank", "replace_modules", "rotate_p4", "standardize_weight",
    "standardize_weights", "standardize_layers", "LayerGroup", "is_groupable", "WSConv1d", "WSConv3d",
    "ScaledWSConv1d", "ScaledWSConv3d", "WSConvTranspose2d", "AffineWS", "AffineWSConv1d", "AffineWSConv2d",
    "AffineWSConv2dSame", "AffineWSConv3d", "AffineWSLinear", "MaxPool2dSame", "held_by_standardization",
]
