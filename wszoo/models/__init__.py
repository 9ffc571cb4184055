"""Model families; importing this package registers every architecture with :mod:`wszoo.registry`."""
from .nfnet import NFNetConfig, NormFreeNet
from .resnet_gn_ws import GNWSResNet
from .resnet_mini import MiniResNet
from .resnetv2_bit import ResNetV2
from .vit_hybrid import HybridViT

__all__ = ["GNWSResNet", "MiniResNet", "NFNetConfig", "NormFreeNet", "ResNetV2", "HybridViT"]
