"""HSNet (Hypercorrelation Squeeze Networks, Min et al., ICCV 2021) in the five steps of model/base.py.

No prototypes and no base learner: every intermediate block of a frozen torchvision backbone is
correlated densely between the query and the masked support (one 4-D cosine map per block,
negative values clipped), the maps are stacked into three levels (strides 8, 16 and 32), and
the hypercorrelation learner (``hpn_learner``: center-pivot 4-D convolutions squeezing the
support dimensions, then a 2-D decoder) turns them into foreground/background logits.

In the five steps:

1. ``extract``: the blocks' feature maps (ResNet: bottleneck outputs before their final ReLU,
   from layer2 on; VGG16: conv4_x and conv5_x before their ReLU, then pool5);
2. ``match``: the hypercorrelation of every (query, support shot) pair (:class:`Hypercorrelation`);
   EFTNet's K x K table of the supports against each other (``support_table``) is computed
   entry by entry as the learner's passes read it, and kept within a budget;
3. ``embed`` is empty (nothing trainable sees a support on its own) and ``guide`` keeps the shots
   apart: EFTNet's blend mixes the pseudo-labelled query's hypercorrelation into each shot's;
4. ``decode``: the learner on every shot; with K shots the answer is HSNet's vote (each shot's
   argmax summed, divided by the image's largest vote, foreground from 0.5), and the logits
   that EFTNet fine-tunes are the shots' mean.

The released files were saved from ``nn.DataParallel`` (``module.`` keys, stripped on loading)
and keep the unused ImageNet head of the backbone (``fc`` / ``classifier``), which is checked
for shape and dropped (``unused_checkpoint_keys``) rather than built.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torchvision.models import mobilenet_v2, resnet50, resnet101
from torchvision.models.vgg import cfgs as vgg_configs, make_layers as vgg_features

from model.backbones import bottleneck_tap
from model.base import Blendable, FewShotModel, Prediction, ShotTable
from model.ops import resize
from model.similarity import CacheBudget

PASS_FACTOR = 4  # a learner pass's peak memory over its input's (``pairs_per_pass``)
UNIT_EPS = 1e-5  # HSNet's epsilon in x / (|x| + eps) before the correlation
# VGG16 ``features`` indices whose outputs are taken: conv4_1..3 and conv5_1..3 (before their
# in-place ReLU) and pool5.
VGG_TAPS = (17, 19, 21, 24, 26, 28, 30)
# MobileNetV2 ``features`` blocks taken (the demo backbone): strides 8 (4-6), 16 (7-13), 32 (14-16).
MOBILENET_TAPS = tuple(range(4, 17))
# Blocks per level (stride 8, 16, 32): the learner's input channels.
LEVELS = {"resnet50": (4, 6, 3), "resnet101": (4, 23, 3), "vgg": (3, 3, 1), "mobilenetv2": (3, 7, 3)}
WIDTHS = (16, 64, 128)  # the learner's widths in the released models (GroupNorm: multiples of 4)
# The released files keep the ImageNet classifier of the torchvision backbone.
UNUSED_HEADS = {
    "resnet50": {"backbone.fc.weight": (1000, 2048), "backbone.fc.bias": (1000,)},
    "resnet101": {"backbone.fc.weight": (1000, 2048), "backbone.fc.bias": (1000,)},
    "vgg": {"backbone.classifier.0.weight": (4096, 25088), "backbone.classifier.0.bias": (4096,),
              "backbone.classifier.3.weight": (4096, 4096), "backbone.classifier.3.bias": (4096,),
              "backbone.classifier.6.weight": (1000, 4096), "backbone.classifier.6.bias": (1000,)},
    "mobilenetv2": {},
}


# ---- 1. the frozen backbone ---------------------------------------------------------------------
class _Features(nn.Module):
    """A torchvision ``features`` stack under its torchvision key names (``features.N``)."""

    def __init__(self, features: nn.Sequential):
        super().__init__()
        self.features = features


def build_backbone(name: str) -> nn.Module:
    """The torchvision backbone without its ImageNet head, keys as torchvision names them."""
    if name in ("resnet50", "resnet101"):
        net = (resnet50 if name == "resnet50" else resnet101)(weights=None)
        del net.fc
        return net
    if name == "vgg":
        return _Features(vgg_features(vgg_configs["D"], batch_norm=False))
    if name == "mobilenetv2":
        return _Features(mobilenet_v2(weights=None).features[:MOBILENET_TAPS[-1] + 1])
    raise ValueError(f"HSNet backbone must be one of {sorted(LEVELS)}, got {name!r}")


def resnet_taps(net: nn.Module, images: Tensor) -> list[Tensor]:
    """Every bottleneck output of layer2..layer4 before its final ReLU."""
    feat = net.maxpool(net.relu(net.bn1(net.conv1(images))))
    feat = net.layer1(feat)
    taps = []
    for layer in (net.layer2, net.layer3, net.layer4):
        for block in layer:
            tap, feat = bottleneck_tap(block, feat)
            taps.append(tap)
    return taps


def feature_taps(features: nn.Sequential, images: Tensor, indices: tuple[int, ...]) -> list[Tensor]:
    """Outputs of ``features[i]`` for i in ``indices``, taken before the next (in-place) module."""
    taps, feat = [], images
    for index, module in enumerate(features[:indices[-1] + 1]):
        feat = module(feat)
        if index in indices:
            taps.append(feat.clone())
    return taps


@dataclass
class FeatureStack:
    """The backbone's per-block maps of a batch of images (level order: stride 8, 16, 32)."""

    taps: list[Tensor]
    image_size: tuple[int, int]
    cache: dict = field(default_factory=dict)

    def __getitem__(self, index: slice) -> "FeatureStack":
        return FeatureStack([t[index] for t in self.taps], self.image_size,
                            {key: [v[index] for v in value] for key, value in self.cache.items()})

    @property
    def batch(self) -> int:
        return self.taps[0].shape[0]


# ---- 2. hypercorrelations -----------------------------------------------------------------------
@dataclass
class Hypercorrelation(ShotTable, Blendable):
    """The hypercorrelation of each (query, support shot) pair, per level
    [B, K, blocks, hq, wq, hs, ws]. It is also the guidance: the shots stay apart until the vote."""

    corr_l4: Tensor
    corr_l3: Tensor
    corr_l2: Tensor

    @property
    def pairs(self) -> tuple[int, int]:
        """(queries, shots)."""
        return tuple(self.corr_l4.shape[:2])

    def levels(self, start: int, stop: int) -> list[Tensor]:
        """The learner's input [l4, l3, l2] for the (query, shot) pairs ``start:stop`` of the
        flattened pair axis (query-major)."""
        return [t.flatten(0, 1)[start:stop] for t in (self.corr_l4, self.corr_l3, self.corr_l2)]

    def blend(self, other: "Hypercorrelation", weights: tuple[float, float]) -> "BlendedHypercorrelation":
        """``w0 * self + w1 * other``, computed pass by pass when decoded (a K x K table of
        EFTNet's s2q is not copied whole)."""
        return BlendedHypercorrelation(self, other, weights)

    def replace_diagonal(self, other: "Hypercorrelation") -> "DiagonalReplaced":
        """The square [K, K] table with entry [i, i] taken from ``other`` [K, 1], read pass by
        pass rather than copied."""
        return DiagonalReplaced(self, other)


def join(parts: list[list[Tensor]]) -> list[Tensor]:
    """Per level, the pairs' tensors joined along the pair axis (one pair: as it is, uncopied)."""
    return list(parts[0]) if len(parts) == 1 else [torch.cat(level) for level in zip(*parts)]


@dataclass
class DiagonalReplaced:
    """EFTNet's s2q table: the supports' [K, K] table with the query in each support's slot."""

    table: Hypercorrelation | SupportTable
    diagonal: Hypercorrelation

    @property
    def pairs(self) -> tuple[int, int]:
        return self.table.pairs

    def levels(self, start: int, stop: int) -> list[Tensor]:
        k = self.pairs[1]  # the table's own diagonal entries are never read
        return join([self.diagonal.levels(i // k, i // k + 1) if i // k == i % k else self.table.levels(i, i + 1)
                     for i in range(start, stop)])

    def blend(self, other: Hypercorrelation, weights: tuple[float, float]) -> "BlendedHypercorrelation":
        return BlendedHypercorrelation(self, other, weights)


@dataclass
class BlendedHypercorrelation:
    """EFTNet's guidance ``w0 * real + w1 * same``: ``same`` holds one shot per query, mixed into
    every shot of ``real``; the learner's input of a pass is computed when asked for."""

    real: Hypercorrelation | DiagonalReplaced
    same: Hypercorrelation | SupportTable
    weights: tuple[float, float]

    @property
    def pairs(self) -> tuple[int, int]:
        return self.real.pairs

    def levels(self, start: int, stop: int) -> list[Tensor]:
        w0, w1 = self.weights
        real = self.real.levels(start, stop)
        first = start // self.pairs[1]          # the queries of the pairs start:stop, and only those
        same = self.same.levels(first, (stop - 1) // self.pairs[1] + 1)
        queries = torch.arange(start, stop, device=real[0].device) // self.pairs[1] - first
        return [r * w0 + s[queries] * w1 for r, s in zip(real, same)]


class PairEntries:
    """Hypercorrelations of support i (as the query) with support j (under its mask), computed
    when asked for and kept while ``budget`` allows (None: never kept)."""

    def __init__(self, model: "HSNet", supports: FeatureStack, masks: Tensor, budget: Optional[CacheBudget]):
        self.model, self.supports, self.masks, self.budget = model, supports, masks, budget
        self.kept: dict[tuple[int, int], list[Tensor]] = {}

    def __call__(self, i: int, j: int) -> list[Tensor]:
        """[l4, l3, l2] of entry [i, j], each [1, blocks, h, w, h, w]."""
        if (i, j) in self.kept:
            return self.kept[i, j]
        levels = self.model.match(self.supports[i:i + 1], self.supports[j:j + 1], self.masks[:, j:j + 1]).levels(0, 1)
        if self.budget is not None and self.budget.take(sum(t.numel() * t.element_size() for t in levels)):
            self.kept[i, j] = levels
        return levels


@dataclass
class SupportTable:
    """EFTNet's [K, K] table of the supports against each other, read pass by pass from
    :class:`PairEntries`: entries past the budget are recomputed at every read, so the table
    takes at most the budget (a 400 px ResNet-50 entry is 110 MB, and there are K x K)."""

    entries: PairEntries
    cells: list[tuple[int, int]]     # (i, j) of each pair, query-major
    pairs: tuple[int, int]

    @classmethod
    def square(cls, entries: PairEntries) -> "SupportTable":
        k = entries.supports.batch
        return cls(entries, [(i, j) for i in range(k) for j in range(k)], (k, k))

    def levels(self, start: int, stop: int) -> list[Tensor]:
        return join([self.entries(i, j) for i, j in self.cells[start:stop]])

    def diagonal(self) -> "SupportTable":
        """Entry [i, i] as [K, 1]."""
        k = self.pairs[0]
        return SupportTable(self.entries, [(i, i) for i in range(k)], (k, 1))

    def replace_diagonal(self, other: Hypercorrelation) -> DiagonalReplaced:
        return DiagonalReplaced(self, other)


# What ``decode`` reads: a table, or EFTNet's views of tables (``pairs``, ``levels``).
Guidance = Hypercorrelation | DiagonalReplaced | BlendedHypercorrelation | SupportTable


def unit_maps(feat: Tensor) -> Tensor:
    """[N, C, h, w] -> [N, C, h*w], each position divided by its norm + ``UNIT_EPS``."""
    flat = feat.flatten(2)
    return flat / (flat.norm(dim=1, p=2, keepdim=True) + UNIT_EPS)


def correlation(query_units: Tensor, support: Tensor, mask: Tensor, bs: int) -> Tensor:
    """relu(cosine) of every query position [B, C, Q] with every position of the masked supports
    ``support`` [Bs*K, C, h, w] (``mask`` [Bs*K, 1, S, S] bilinear-resized into it) ->
    [B, K, h_q, w_q, h, w]; ``bs`` is 1 (supports shared by the queries) or B."""
    masked = support * resize(mask, support.shape[-2:])
    units = unit_maps(masked)
    units = units.reshape(bs, -1, *units.shape[1:])                        # [Bs, K, C, P]
    corr = query_units.transpose(1, 2)[:, None] @ units                     # [B, K, Q, P]
    return corr.clamp(min=0)


# ---- 4. the learner -----------------------------------------------------------------------------
class CenterPivotConv4d(nn.Module):
    """4-D convolution over [B, C, hq, wq, hs, ws] as the sum of two 2-D ones through the kernel's
    center: ``conv1`` over the query dims at every ``stride``-th support position, ``conv2``
    over the support dims (with that stride) at every query position."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, support_stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        self.conv2 = nn.Conv2d(in_channels, out_channels, kernel_size, stride=support_stride,
                               padding=kernel_size // 2)
        self.support_stride = support_stride

    def forward(self, x: Tensor) -> Tensor:
        b, c, hq, wq, hs, ws = x.shape
        s = self.support_stride
        pivots = x[..., ::s, ::s] if s > 1 else x
        h2, w2 = pivots.shape[-2:]
        out1 = self.conv1(pivots.permute(0, 4, 5, 1, 2, 3).reshape(-1, c, hq, wq))
        out1 = out1.view(b, h2, w2, *out1.shape[1:]).permute(0, 3, 4, 5, 1, 2)
        out2 = self.conv2(x.permute(0, 2, 3, 1, 4, 5).reshape(-1, c, hs, ws))
        out2 = out2.view(b, hq, wq, *out2.shape[1:]).permute(0, 3, 1, 2, 4, 5)
        return out1 + out2


def squeeze_block(in_channels: int, out_channels: tuple[int, ...], kernels: tuple[int, ...],
                  strides: tuple[int, ...], groups: int = 4) -> nn.Sequential:
    """4-D conv, GroupNorm and ReLU per (width, kernel, support stride)."""
    layers: list[nn.Module] = []
    for width, kernel, stride in zip(out_channels, kernels, strides):
        layers += [CenterPivotConv4d(in_channels, width, kernel, stride), nn.GroupNorm(groups, width),
                   nn.ReLU(inplace=True)]
        in_channels = width
    return nn.Sequential(*layers)


def resize_query_dims(x: Tensor, size: torch.Size) -> Tensor:
    """Bilinear resize of the query dims of [B, C, hq, wq, hs, ws] to ``size``."""
    b, c, hq, wq, hs, ws = x.shape
    flat = resize(x.permute(0, 4, 5, 1, 2, 3).reshape(-1, c, hq, wq), size)
    return flat.view(b, hs, ws, c, *size).permute(0, 3, 4, 5, 1, 2)


class HypercorrelationLearner(nn.Module):
    """Squeezes each level's support dims, mixes the levels coarse to fine, averages the
    remaining support positions and decodes logits at twice the finest query size."""

    def __init__(self, levels: tuple[int, int, int], widths: tuple[int, int, int] = WIDTHS):
        super().__init__()
        n2, n3, n4 = levels
        _, middle, wide = widths
        self.encoder_layer4 = squeeze_block(n4, widths, (3, 3, 3), (2, 2, 2))
        self.encoder_layer3 = squeeze_block(n3, widths, (5, 3, 3), (4, 2, 2))
        self.encoder_layer2 = squeeze_block(n2, widths, (5, 5, 3), (4, 4, 2))
        self.encoder_layer4to3 = squeeze_block(wide, (wide,) * 3, (3,) * 3, (1,) * 3)
        self.encoder_layer3to2 = squeeze_block(wide, (wide,) * 3, (3,) * 3, (1,) * 3)
        self.decoder1 = nn.Sequential(nn.Conv2d(wide, wide, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(wide, middle, 3, padding=1), nn.ReLU())
        self.decoder2 = nn.Sequential(nn.Conv2d(middle, middle, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(middle, 2, 3, padding=1))

    def forward(self, pyramid: list[Tensor]) -> Tensor:
        """[l4, l3, l2] hypercorrelations [N, blocks, hq, wq, hs, ws] -> logits [N, 2, 2*hq2, 2*hq2]."""
        sqz4 = self.encoder_layer4(pyramid[0])
        sqz3 = self.encoder_layer3(pyramid[1])
        sqz2 = self.encoder_layer2(pyramid[2])
        mix43 = self.encoder_layer4to3(resize_query_dims(sqz4, sqz3.shape[2:4]) + sqz3)
        mix432 = self.encoder_layer3to2(resize_query_dims(mix43, sqz2.shape[2:4]) + sqz2)
        encoded = mix432.flatten(4).mean(-1)
        decoded = self.decoder1(encoded)
        side = decoded.shape[-1] * 2  # HSNet doubles the width for both sides
        return self.decoder2(resize(decoded, (side, side)))


def vote(logits: Tensor) -> Tensor:
    """HSNet's K-shot answer from per-shot logits [B, K, 2, S, S] as [B, 2, S, S] scores whose
    argmax is foreground where the summed argmax votes reach half the image's largest vote.

    The votes are multiples of 1/m with m <= K, so ``v >= 0.5`` equals ``v > 0.5 - 1/(4K)``, the
    constant background score used here."""
    votes = logits.argmax(2).sum(1).float()
    largest = votes.flatten(1).amax(1).clamp(min=1).view(-1, 1, 1)
    share = votes / largest
    threshold = torch.full_like(share, 0.5 - 1 / (4 * logits.shape[1]))
    return torch.stack([threshold, share], 1)


# ---- the model ----------------------------------------------------------------------------------
class HSNet(FewShotModel):
    """HSNet with the released key layout (``backbone.*``, ``hpn_learner.*``)."""

    backbone_prefixes = ("backbone.",)
    weights_depend_on_shot = False  # K shots vote with the 1-shot model

    def __init__(self, backbone: str, shot: int = 1, widths: tuple[int, int, int] = WIDTHS, pass_mb: float = 0):
        super().__init__()
        if backbone not in LEVELS:
            raise ValueError(f"HSNet backbone must be one of {sorted(LEVELS)}, got {backbone!r}")
        if len(widths) != 3 or any(w < 4 or w % 4 for w in widths):
            raise ValueError(f"HSNet widths must be three multiples of 4 (GroupNorm's 4 groups), got {widths!r}")
        self.backbone_name = backbone
        self.shot = shot
        self.levels = LEVELS[backbone]
        self.backbone = build_backbone(backbone)
        self.hpn_learner = HypercorrelationLearner(self.levels, tuple(widths))
        self.pass_mb = pass_mb

    # ---- 1. ----
    @torch.no_grad()
    def extract(self, images: Tensor) -> FeatureStack:
        if self.backbone_name in ("resnet50", "resnet101"):
            taps = resnet_taps(self.backbone, images)
        elif self.backbone_name == "vgg":
            taps = feature_taps(self.backbone.features, images, VGG_TAPS)
        else:
            taps = feature_taps(self.backbone.features, images, MOBILENET_TAPS)
        return FeatureStack(taps, tuple(images.shape[-2:]))

    # ---- 2. ----
    @torch.no_grad()
    def match(self, query: FeatureStack, support: FeatureStack, masks: Tensor) -> Hypercorrelation:
        bs, k = masks.shape[:2]
        fg = (masks == 1).float().flatten(0, 1).unsqueeze(1)                 # [Bs*K, 1, S, S]
        units = self._query_units(query)
        maps = [correlation(u, s, fg, bs) for u, s in zip(units, support.taps)]
        n2, n3, _ = self.levels
        shapes = [(*q.shape[-2:], *s.shape[-2:]) for q, s in zip(query.taps, support.taps)]
        maps = [m.view(*m.shape[:2], *shape) for m, shape in zip(maps, shapes)]   # [B, K, hq, wq, hs, ws]
        return Hypercorrelation(corr_l4=torch.stack(maps[n2 + n3:], 2), corr_l3=torch.stack(maps[n2:n2 + n3], 2),
                                corr_l2=torch.stack(maps[:n2], 2))

    def support_table(self, supports: FeatureStack, masks: Tensor, budget: Optional[CacheBudget] = None) -> SupportTable:
        """The [K, K] table computed entry by entry as it is read, within ``budget``."""
        self._query_units(supports)  # once for the stack: the slices of its entries share them
        return SupportTable.square(PairEntries(self, supports, masks, budget))

    @staticmethod
    def _query_units(feats: FeatureStack) -> list[Tensor]:
        if "units" not in feats.cache:
            feats.cache["units"] = [unit_maps(t) for t in feats.taps]
        return feats.cache["units"]

    # ---- 3. ----
    def embed(self, images: FeatureStack) -> Tensor:
        return images.taps[0].new_zeros(images.batch, 0)

    def guide(self, stats: Guidance, embeddings: Tensor) -> Guidance:
        return stats

    # ---- 4. ----
    def decode(self, query: FeatureStack, guidance: Guidance) -> Prediction:
        b, k = guidance.pairs
        step = self.pairs_per_pass(query, b * k)
        split = step < b * k and torch.is_grad_enabled()
        # Each pass's input is made when the pass runs and let go after it.
        outputs = [self._learner_pass(guidance.levels(i, min(i + step, b * k)), split) for i in range(0, b * k, step)]
        logits = resize(torch.cat(outputs), query.image_size)
        logits = logits.view(b, k, *logits.shape[1:])
        if k == 1:
            return Prediction(final=logits[:, 0], meta=logits[:, 0])
        return Prediction(final=vote(logits), meta=logits.mean(1))

    def _learner(self, *levels: Tensor) -> Tensor:
        return self.hpn_learner(list(levels))

    def _learner_pass(self, levels: list[Tensor], split: bool) -> Tensor:
        if split:
            # Recompute the pass in the backward instead of keeping its activations: EFTNet's q2s
            # with K shots would otherwise hold every pass's 4-D maps for its one step.
            return checkpoint(self._learner, *levels, use_reentrant=False)
        return self._learner(*levels)

    def pairs_per_pass(self, query: FeatureStack, pairs: int) -> int:
        """How many of ``pairs`` (query, shot) pairs of images the size of ``query``'s go
        through the learner at once: all of them, or as many as fit in ``pass_mb`` (at least
        one). A pass takes about four times its input (a pair: every tap's positions squared):
        the first 4-D convolution holds a permuted copy of the finest level and two outputs of
        its size. With gradients, split passes are recomputed in the backward (activation
        checkpointing), so that only one pass's activations are held at a time."""
        if self.pass_mb <= 0:
            return pairs
        per_pair = PASS_FACTOR * sum((t.shape[-2] * t.shape[-1]) ** 2 * t.element_size() for t in query.taps)
        return max(1, min(pairs, int(self.pass_mb * 2**20 // per_pair)))

    # ---- what EFTNet adapts ----
    def adapted_modules(self) -> list[nn.Module]:
        return [self.hpn_learner]

    def frozen_modules(self) -> list[nn.Module]:
        return [self.backbone]

    def foreground_probability(self, prediction: Prediction) -> Tensor:
        """EFTNet's q2s confidence: the softmax of the (shot-averaged) logits."""
        return prediction.meta.softmax(1)[:, 1]

    def unused_checkpoint_keys(self) -> dict[str, tuple[int, ...]]:
        """Keys the released files carry that this model does not build, with their shapes."""
        return dict(UNUSED_HEADS[self.backbone_name])

    def imagenet_backbone_state(self, state: dict[str, Any]) -> dict[str, Tensor]:
        """A torchvision ImageNet file under ``backbone.*``, without what the backbone does not
        build (the classifier; MobileNetV2's blocks after the last one taken)."""
        own = self.backbone.state_dict()
        return {f"backbone.{k}": v for k, v in state.items() if k in own}
