"""One registered CNN per code path, for the checks that repeat per model (timm's battery, the model API,
forward/backward): `make test` runs them on these, `make test-slow` on every other registered model.

The others are deeper or wider copies of the same modules: the NF-ResNets with SE or ECA put the same
attention module in the same place (``attn_last``) as dm_nfnet_f0 (SE) and eca_nfnet_l0 (ECA); nfnet_f0 and
nfnet_l0 are dm_nfnet_f0's and eca_nfnet_l0's blocks with another activation constant or attention."""
import wszoo

# the CNN families; the ViT hybrids (timm's own VisionTransformer on a WS CNN) have their checks in test_vit_hybrid.py
CNNS = [n for n in wszoo.list_models() if wszoo.registry.model_family(n) != "vit_hybrid"]

REPRESENTATIVES = {
    "resnet_mini_gn_ws", "resnet_mini_bcn_ws", "resnet_mini_gn", "resnet_mini_bn",  # each normalizer
    "resnet50_gn_ws", "resnext50_32x4d_gn_ws",  # qiao WS; grouped convs
    "resnetv2_50x1_bit",  # pre-activation GN+WS, conv classifier
    "nf_resnet26",  # 7x7 stem and pool, ReLU, average-pool shortcuts, no attention
    "nf_regnet_b0",  # 3x3 stem, RegNet blocks (SE before conv3), final conv
    "eca_nfnet_l0",  # deep stem, extra conv, SiLU, ECA after conv3, gamma in the convs
    "dm_nfnet_f0",  # TF 'SAME' padding, GELU with gamma in the activation, SE after conv3, skipinit gains
}
assert REPRESENTATIVES <= set(CNNS), REPRESENTATIVES - set(CNNS)
