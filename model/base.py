"""The five steps a few-shot segmenter exposes so that EFTNet can adapt it (docs/plugging_in.md).

A prediction of a query from K annotated supports is computed in steps that EFTNet reuses
separately within an episode:

1. ``extract(images)``: frozen features, computed once per image and episode. The result knows
   its batch size (``.batch``) and slices along it (``features[i:j]``).
2. ``match(query, support, masks)``: parameter-free statistics of every (query, support shot)
   pair, a :class:`ShotTable` laid out [B, K, ...]; ``matcher`` gives the same for fixed images
   and masks that change from call to call (EFTNet's rounds), and may keep work between calls;
   ``support_table`` the supports against each other.
3. ``embed(images)`` + ``guide(stats, embeddings)``: the trainable per-image encoding of the
   supports (may be empty) and the guidance of the decoder, a :class:`Blendable`.
4. ``decode(query, guidance)``: the :class:`Prediction`.

Besides the steps, a model names the modules EFTNet fine-tunes (``adapted_modules``), the ones
that always stay in eval mode (``frozen_modules``) and the loss of a fine-tuning step
(``adaptation_loss``). EFTNet knows nothing else of the model.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Callable, ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.contract import IGNORE, check_forward_inputs


@dataclass
class Prediction:
    """Model outputs at input resolution. ``final`` [B,2,S,S]: the model's answer, whose argmax
    is the predicted mask (EFTNet's pseudo labels and q2s confidence read it); ``meta``
    [B,2,S,S]: logits of the adapted part; ``base`` [B,C_base,S,S]: logits of a frozen base
    learner over the base classes, None for a model without one."""

    final: Tensor
    meta: Tensor
    base: Optional[Tensor] = None


class ShotTable:
    """A dataclass of tensors laid out [B, K, ...] (query, support shot); fields may be None.

    EFTNet builds its square tables of the supports against each other from these rows and
    columns (s2q: each support in turn segmented with the query in its own slot)."""

    def _map(self, fn: Callable[..., Tensor], *others: "ShotTable") -> Any:
        values = {}
        for f in fields(self):
            value = getattr(self, f.name)
            values[f.name] = None if value is None else fn(value, *(getattr(o, f.name) for o in others))
        return type(self)(**values)

    @staticmethod
    def cat(parts: list[Any], dim: int = 1) -> Any:
        """Join tables along the shot axis (dim 1) or the query axis (dim 0)."""
        return parts[0]._map(lambda *ts: torch.cat(ts, dim), *parts[1:])

    def shot(self, k: int) -> Any:
        return self._map(lambda t: t[:, k:k + 1])

    def diagonal(self) -> Any:
        """Entry [i, i] of a square [K, K] table, as [K, 1]."""
        return self._map(lambda t: t.diagonal(0, 0, 1).movedim(-1, 0).unsqueeze(1))

    def replace_diagonal(self, other: Any) -> Any:
        """Square [K, K] table with entry [i, i] taken from ``other`` [K, 1]."""
        def swap(t: Tensor, o: Tensor) -> Tensor:
            eye = torch.eye(t.shape[0], dtype=torch.bool, device=t.device)
            return torch.where(eye.view(*eye.shape, *[1] * (t.dim() - 2)), o.expand_as(t), t)
        return self._map(swap, other)


class Blendable:
    """A dataclass of guidance tensors that EFTNet mixes: ``w0 * self + w1 * other`` field by
    field (broadcast, so that a one-shot ``other`` is mixed into every shot of ``self``), except
    the fields named in ``UNBLENDED`` (kept from ``self``) and the fields that are None."""

    UNBLENDED: ClassVar[tuple[str, ...]] = ()

    def blend(self, other: Any, weights: tuple[float, float]) -> Any:
        w0, w1 = weights
        mixed = {f.name: getattr(self, f.name) * w0 + getattr(other, f.name) * w1
                 for f in fields(self) if f.name not in self.UNBLENDED and getattr(self, f.name) is not None}
        return replace(self, **mixed)


class FewShotModel(nn.Module):
    """A few-shot segmenter in the five steps EFTNet reuses; ``forward`` chains them.

    ``shot``: the number of supports the model was built for (1 also always works)."""

    shot: int = 1
    backbone_name: str = ""                     # e.g. resnet50, vgg, mobilenetv2
    backbone_prefixes: tuple[str, ...] = ()     # state_dict keys of the frozen backbone
    predicts_base_classes: bool = False         # Prediction.base is given (a base learner)
    weights_depend_on_shot: bool = True         # a checkpoint is made for one number of shots

    # ---- 1. frozen features ---------------------------------------------------------------
    def extract(self, images: Tensor) -> Any:
        """Features of [N,3,S,S] images, with ``.batch`` and batch slicing (no autograd)."""
        raise NotImplementedError

    # ---- 2. parameter-free statistics -----------------------------------------------------
    def match(self, query: Any, support: Any, masks: Tensor) -> ShotTable:
        """Statistics of each query against its K supports. ``masks`` [Bs,K,S,S] (0/1/255);
        ``support`` holds Bs*K images, Bs equal to the query batch or 1 (shared)."""
        raise NotImplementedError

    def matcher(self, query: Any, support: Any, budget: Optional[Any] = None) -> Callable[[Tensor], ShotTable]:
        """``match`` for fixed images and masks that change from call to call (EFTNet's
        rounds); a model may keep work between calls within ``budget`` (a CacheBudget)."""
        return lambda masks: self.match(query, support, masks)

    def support_table(self, supports: Any, masks: Tensor, budget: Optional[Any] = None) -> ShotTable:
        """Each support against every support under the fixed ``masks`` [1,K,S,S]: the [K, K]
        table that EFTNet's s2q reads every round. The default computes it at once, a row per
        support; a model whose table is large may compute entries as they are read, keeping
        what fits in ``budget`` (a CacheBudget; None: nothing)."""
        return ShotTable.cat([self.match(supports[k:k + 1], supports, masks) for k in range(supports.batch)], dim=0)

    # ---- 3. trainable guidance ------------------------------------------------------------
    def embed(self, images: Any) -> Tensor:
        """Trainable encoding of support images [N, ...]; [N, 0] for a model without one."""
        raise NotImplementedError

    def guide(self, stats: ShotTable, embeddings: Tensor) -> Blendable:
        """Guidance from the K shots of ``stats`` and support embeddings [B, K, ...]."""
        raise NotImplementedError

    # ---- 4. decoding ----------------------------------------------------------------------
    def decode(self, query: Any, guidance: Blendable) -> Prediction:
        raise NotImplementedError

    # ---- what EFTNet adapts ---------------------------------------------------------------
    def adapted_modules(self) -> list[nn.Module]:
        """The modules EFTNet fine-tunes, one SGD parameter group each."""
        raise NotImplementedError

    def frozen_modules(self) -> list[nn.Module]:
        """Modules kept in eval mode whatever ``train(mode)`` says (e.g. a frozen backbone)."""
        return []

    def foreground_probability(self, prediction: Prediction) -> Tensor:
        """[B,S,S] confidence in the foreground that EFTNet's q2s mask ranks: the softmax of
        ``final`` (the reference's, applied to its ensemble output)."""
        return prediction.final.softmax(1)[:, 1]

    def adaptation_loss(self, prediction: Prediction, label: Tensor, aux_weight: float) -> Tensor:
        """Loss of one fine-tuning step towards ``label`` [B,S,S] (255 ignored): cross-entropy
        of the adapted part's logits; ``aux_weight`` is for models with a second output."""
        return F.cross_entropy(prediction.meta, label, ignore_index=IGNORE)

    def unused_checkpoint_keys(self) -> dict[str, tuple[int, ...]]:
        """Keys (with shapes) that released files of this model carry but the model does not
        build, e.g. a backbone's ImageNet classifier: checked for shape and dropped on loading."""
        return {}

    # ---- the plain model ------------------------------------------------------------------
    def forward(self, query_img: Tensor, support_imgs: Tensor, support_masks: Tensor) -> Prediction:
        """Prediction of query [B,3,S,S] from supports [B,K,3,S,S] under masks [B,K,S,S] (0/1/255)."""
        check_forward_inputs(self, query_img, support_imgs, support_masks)
        query = self.extract(query_img)
        support = self.extract(support_imgs.flatten(0, 1))
        stats = self.match(query, support, support_masks)
        embeddings = self.embed(support)
        return self.decode(query, self.guide(stats, embeddings.reshape(*support_masks.shape[:2], *embeddings.shape[1:])))

    def train(self, mode: bool = True) -> "FewShotModel":
        """Frozen modules stay in eval mode whatever ``mode`` is."""
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()
        return self
