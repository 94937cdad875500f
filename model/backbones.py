"""Frozen backbones of the FSS models and the feature taps MSANet correlates.

Both backbones are split into the five stages ``layer0..layer4`` that the released
checkpoints name. The ResNets are the PSPNet "deep stem" variant with *every* block of
layer3 dilated 2 and of layer4 dilated 4 (output stride 8); torchvision's
``replace_stride_with_dilation`` keeps a smaller dilation in each stage's first block and
so computes something else. VGG16-BN uses ``ceil_mode=True`` pools (473 -> 30, not 29).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import mobilenet_v2
from torchvision.models.vgg import cfgs as vgg_configs, make_layers as vgg_features
from torchvision.models.resnet import Bottleneck

RESNET_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
# VGG16-BN ``features`` indices of each stage (pool5 at 43 is dropped).
VGG_STAGES = ((0, 7), (7, 14), (14, 24), (24, 34), (34, 43))
# Inside VGG layer3 and layer4, MSANet taps the raw conv outputs (before BN) of these modules.
VGG_TAP_MODULES = (0, 3, 6)
# MobileNetV2 (the demo's small ImageNet backbone): ``features`` slices and the dilation of the
# depthwise convs in layer3/layer4 that keep output stride 8. It ends with its 96-channel blocks
# 11-13 (layer4; layer3 is blocks 7-10, 64 channels). Its deepest blocks (14-16, 160
# channels) are left out: their ImageNet features describe the demo's synthetic textures
# poorly (in a probe with the same training, a base learner reading them reached less than half
# the base-class mIoU of one reading blocks 11-13).
MOBILENET_STAGES = ((0, 2), (2, 4), (4, 7), (7, 11), (11, 14))
MOBILENET_DILATIONS = {3: 2, 4: 2}


@dataclass
class Features:
    """What the frozen backbone computes for a batch of images, reused across an episode.

    ``mid`` is cat(layer3, layer2) at layer3's size (the input of down_query/down_supp);
    ``taps`` are MSANet's per-block feature maps; ``cache`` holds further frozen results
    (Gram matrices, base-learner logits) computed on first use or handed in by training.
    """

    layer2: Tensor
    layer3: Tensor
    layer4: Tensor
    mid: Tensor
    taps: list[Tensor] = field(default_factory=list)
    image_size: tuple[int, int] = (0, 0)
    cache: dict = field(default_factory=dict)

    def __getitem__(self, index: slice) -> "Features":
        """Batch slice (views, no copy), cached results included."""
        return Features(self.layer2[index], self.layer3[index], self.layer4[index], self.mid[index],
                        [t[index] for t in self.taps], self.image_size,
                        {key: [v[index] for v in value] if isinstance(value, list) else value[index]
                         for key, value in self.cache.items()})

    @property
    def batch(self) -> int:
        return self.layer4.shape[0]


def resnet_layers(depth: int) -> list[nn.Module]:
    """layer0..layer4 of the deep-stem dilated ResNet-50/101, keys as in the releases."""
    if depth not in RESNET_BLOCKS:
        raise ValueError(f"ResNet depth must be one of {sorted(RESNET_BLOCKS)}, got {depth}")

    def conv_bn_relu(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    layer0 = nn.Sequential(*conv_bn_relu(3, 64, 2), *conv_bn_relu(64, 64), *conv_bn_relu(64, 128),
                           nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
    stages, inplanes = [layer0], 128
    # (width, stride, dilation) per stage; dilated stages keep stride 1 everywhere.
    for blocks, (width, stride, dilation) in zip(RESNET_BLOCKS[depth],
                                                 ((64, 1, 1), (128, 2, 1), (256, 1, 2), (512, 1, 4))):
        downsample = nn.Sequential(nn.Conv2d(inplanes, width * 4, 1, stride, bias=False),
                                   nn.BatchNorm2d(width * 4))
        layer = [Bottleneck(inplanes, width, stride, downsample, dilation=dilation)]
        layer += [Bottleneck(width * 4, width, dilation=dilation) for _ in range(blocks - 1)]
        stages.append(nn.Sequential(*layer))
        inplanes = width * 4
    return stages


def vgg_layers() -> list[nn.Module]:
    """layer0..layer4 of VGG16-BN with ceil-mode pools, each stage re-indexed from 0."""
    features = vgg_features(vgg_configs["D"], batch_norm=True)  # VGG16-BN without its classifier
    for module in features:
        if isinstance(module, nn.MaxPool2d):
            module.ceil_mode = True
        elif isinstance(module, nn.Conv2d):  # torchvision's VGG initialisation
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(module.bias)
    return [nn.Sequential(*features[a:b]) for a, b in VGG_STAGES]


def bottleneck_tap(block: Bottleneck, x: Tensor) -> tuple[Tensor, Tensor]:
    """A bottleneck's output before its final ReLU (the map MSANet correlates), and after."""
    out = block.relu(block.bn1(block.conv1(x)))
    out = block.relu(block.bn2(block.conv2(out)))
    pre = block.bn3(block.conv3(out)) + (block.downsample(x) if block.downsample is not None else x)
    return pre, F.relu(pre)


def _linear_block_tap(block: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """MobileNetV2 blocks end without an activation: the tap is the output."""
    out = block(x)
    return out, out


def run_blocks(layers: list[nn.Module], x: Tensor, with_taps: bool) -> tuple[list[Tensor], list[Tensor]]:
    """Stage outputs of a residual-block backbone and, when asked, one tap per block from
    layer1's last block on (ResNet: pre-ReLU block outputs; MobileNetV2: block outputs)."""
    stages, taps = [layers[0](x)], []
    for stage_index, stage in enumerate(layers[1:], start=1):
        feat = stages[-1]
        for block_index, block in enumerate(stage):
            if not with_taps:
                feat = block(feat)
                continue
            tap, feat = (bottleneck_tap if isinstance(block, Bottleneck) else _linear_block_tap)(block, feat)
            if stage_index > 1 or block_index == len(stage) - 1:
                taps.append(tap)
        stages.append(feat)
    return stages, taps


def run_vgg(layers: list[nn.Module], x: Tensor, with_taps: bool) -> tuple[list[Tensor], list[Tensor]]:
    """Stage outputs and, when asked, the conv taps of layer3/layer4 plus the final output."""
    stages, taps = [], []
    feat = x
    for stage_index, stage in enumerate(layers):
        if stage_index < 3 or not with_taps:
            feat = stage(feat)
        else:
            for module_index, module in enumerate(stage):
                feat = module(feat)
                if module_index in VGG_TAP_MODULES:
                    taps.append(feat)
        stages.append(feat)
    if with_taps:
        taps.append(feat)
    return stages, taps


def mobilenet_layers() -> list[nn.Module]:
    """layer0..layer4 of MobileNetV2 with dilated depthwise convs (output stride 8)."""
    features = mobilenet_v2(weights=None).features
    for stage_index, dilation in MOBILENET_DILATIONS.items():
        start, end = MOBILENET_STAGES[stage_index]
        for module in features[start:end].modules():
            if isinstance(module, nn.Conv2d) and module.groups > 1:
                module.stride, module.dilation, module.padding = (1, 1), (dilation, dilation), (dilation, dilation)
    return [nn.Sequential(*features[a:b]) for a, b in MOBILENET_STAGES]


RESNET_STEM = {"conv1": "layer0.0", "bn1": "layer0.1", "conv2": "layer0.3", "bn2": "layer0.4",
               "conv3": "layer0.6", "bn3": "layer0.7"}  # semseg's deep stem -> layer0
FEATURE_STAGES = {"vgg": VGG_STAGES, "mobilenetv2": MOBILENET_STAGES}  # torchvision ``features.N``


def imagenet_key(key: str, backbone: str) -> str | None:
    """Our key of an ImageNet file's key (semseg ResNet: stem -> layer0; torchvision VGG16-BN /
    MobileNetV2: ``features.N`` -> the stage holding N, re-indexed); None for the classifier."""
    if backbone not in FEATURE_STAGES and backbone not in ("resnet50", "resnet101"):
        raise ValueError(f"unknown backbone {backbone!r}: expected resnet50, resnet101, {', '.join(FEATURE_STAGES)}")
    head, _, rest = key.partition(".")
    if backbone in FEATURE_STAGES:
        if head == "classifier":
            return None
        index, _, tail = rest.partition(".")
        if head != "features" or not index.isdigit():
            return key
        stage = [(i, start) for i, (start, end) in enumerate(FEATURE_STAGES[backbone]) if start <= int(index) < end]
        return f"layer{stage[0][0]}.{int(index) - stage[0][1]}.{tail}" if stage else None
    if head == "fc":
        return None
    return f"{RESNET_STEM[head]}.{rest}" if head in RESNET_STEM else key


@dataclass(frozen=True)
class BackboneSpec:
    """How to build and run a backbone, and its widths (layer4, and cat(layer3, layer2))."""

    build: object
    run: object
    fea_dim: int
    mid_dim: int


BACKBONES = {
    "resnet50": BackboneSpec(lambda: resnet_layers(50), run_blocks, 2048, 1024 + 512),
    "resnet101": BackboneSpec(lambda: resnet_layers(101), run_blocks, 2048, 1024 + 512),
    "vgg": BackboneSpec(vgg_layers, run_vgg, 512, 512 + 256),
    "mobilenetv2": BackboneSpec(mobilenet_layers, run_blocks, 96, 64 + 32),
}
