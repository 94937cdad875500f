"""Few-shot segmentation metrics, following the BAM/MSANet/EFTNet evaluation protocol.

Per episode the prediction is compared with the original-resolution label
(`original_resolution`), pixels are counted per class (`intersection_union`) and the counts are
added to meters. Meters keep plain float64 sums of integer counts (exact up to 2**53), so they
can be saved, reloaded, merged and summed across torch.distributed ranks in any order with
identical results.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

EPS = 1e-10  # the reference's guard in I / (U + eps)


def intersection_union(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                       ignore_index: int = 255) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-class (intersection, union, target) pixel counts, each [num_classes] int64.

    Predictions on ignored target pixels are dropped; values outside 0..num_classes-1 are not
    counted (as with the reference's `torch.histc(bins=K, min=0, max=K-1)`).
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    pred = pred.reshape(-1).long()
    target = target.reshape(-1).long()
    pred = torch.where(target == ignore_index, torch.full_like(pred, ignore_index), pred)

    def count(values: torch.Tensor) -> torch.Tensor:
        values = values[(values >= 0) & (values < num_classes)]
        return torch.bincount(values, minlength=num_classes)

    area_inter = count(pred[pred == target])
    area_pred, area_target = count(pred), count(target)
    return area_inter, area_pred + area_target - area_inter, area_target


def original_resolution(logits: torch.Tensor, label_orig: torch.Tensor,
                        ignore_index: int = 255) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's `ori_resize` geometry: returns (prediction, target), each [L, L] int64.

    The target is an L x L canvas (L = longer side of the original label) filled with
    `ignore_index`, the label pasted top-left. The prediction is the argmax of the [1,C,S,S]
    logits upsampled (bilinear, align_corners=True) from the whole S x S canvas to L x L; the
    slight misalignment this causes is part of the protocol.
    """
    if logits.dim() != 4 or logits.size(0) != 1:
        raise ValueError(f"logits must be [1, C, S, S], got {tuple(logits.shape)}")
    if label_orig.dim() != 2:
        raise ValueError(f"label_orig must be [H, W], got {tuple(label_orig.shape)}")
    height, width = label_orig.shape
    side = max(height, width)
    target = torch.full((side, side), ignore_index, dtype=torch.long, device=logits.device)
    target[:height, :width] = label_orig.to(device=logits.device, dtype=torch.long)
    upsampled = F.interpolate(logits, size=(side, side), mode="bilinear", align_corners=True)
    return upsampled[0].argmax(0), target


def episode_counts(pred_logits: torch.Tensor, label_orig: torch.Tensor, num_classes: int,
                   ignore_index: int = 255) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(intersection, union, target) of one episode's logits against its original label."""
    pred, target = original_resolution(pred_logits, label_orig, ignore_index)
    return intersection_union(pred, target, num_classes, ignore_index)


class _SumMeter:
    """One float64 vector of sums; subclasses name the slices."""

    def __init__(self, size: int):
        self._sums = torch.zeros(size, dtype=torch.float64)

    def _add(self, start: int, values: torch.Tensor, length: int) -> None:
        values = torch.as_tensor(values).detach().reshape(-1)
        if values.numel() != length:
            raise ValueError(f"expected {length} counts, got {values.numel()}")
        self._sums[start:start + length] += values.to(device="cpu", dtype=torch.float64)

    def all_reduce(self) -> None:
        """Sum the state over torch.distributed ranks; a no-op without a process group."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        # NCCL only reduces CUDA tensors.
        device = torch.device("cuda", torch.cuda.current_device()) \
            if dist.get_backend() == "nccl" else torch.device("cpu")
        sums = self._sums.to(device)
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        self._sums = sums.cpu()


class FewShotMeter(_SumMeter):
    """Novel-class metrics: class mIoU, FB-IoU and foreground IoU (pIoU).

    State layout: I[2], U[2], T[2] pooled over all episodes (bg, fg), then fg I[n], fg U[n]
    and episode counts[n] per class of the fold.
    """

    def __init__(self, num_classes_in_fold: int):
        if num_classes_in_fold < 1:
            raise ValueError(f"num_classes_in_fold must be >= 1, got {num_classes_in_fold}")
        self.num_classes = num_classes_in_fold
        super().__init__(6 + 3 * num_classes_in_fold)

    def add(self, class_idx: int, inter: torch.Tensor, union: torch.Tensor,
            target: torch.Tensor) -> None:
        """Add one episode's bg/fg counts; `class_idx` is 0..n-1 within the fold."""
        if not 0 <= class_idx < self.num_classes:
            raise ValueError(f"class_idx {class_idx} outside 0..{self.num_classes - 1}")
        inter, union = torch.as_tensor(inter), torch.as_tensor(union)
        for start, values in ((0, inter), (2, union), (4, target)):
            self._add(start, values, 2)
        n = self.num_classes
        self._add(6 + class_idx, inter.reshape(-1)[1:], 1)
        self._add(6 + n + class_idx, union.reshape(-1)[1:], 1)
        self._sums[6 + 2 * n + class_idx] += 1

    @property
    def episodes_per_class(self) -> torch.Tensor:
        return self._sums[6 + 2 * self.num_classes:].long()

    def class_iou(self) -> torch.Tensor:
        """Foreground IoU per class of the fold; a class never drawn is 0, as in the reference."""
        n = self.num_classes
        return self._sums[6:6 + n] / (self._sums[6 + n:6 + 2 * n] + EPS)

    def class_miou(self) -> float:
        return self.class_iou().mean().item()

    def _pooled_iou(self) -> torch.Tensor:
        return self._sums[0:2] / (self._sums[2:4] + EPS)

    def fb_iou(self) -> float:
        """Mean of bg and fg IoU over pooled (dataset-level) counts."""
        return self._pooled_iou().mean().item()

    def fg_iou(self) -> float:
        return self._pooled_iou()[1].item()


class BaseClassMeter(_SumMeter):
    """Base-class mIoU over channels 1..n of the base learner's output (background skipped).

    State layout: I[n], U[n], T[n].
    """

    def __init__(self, num_base_classes: int):
        if num_base_classes < 1:
            raise ValueError(f"num_base_classes must be >= 1, got {num_base_classes}")
        self.num_classes = num_base_classes
        super().__init__(3 * num_base_classes)

    def add(self, inter: torch.Tensor, union: torch.Tensor, target: torch.Tensor) -> None:
        """Add one episode's counts over all n+1 channels (channel 0, background, is dropped)."""
        n = self.num_classes
        for start, values in ((0, inter), (n, union), (2 * n, target)):
            values = torch.as_tensor(values).reshape(-1)
            if values.numel() != n + 1:
                raise ValueError(f"expected {n + 1} counts (background first), "
                                 f"got {values.numel()}")
            self._add(start, values[1:], n)

    def class_iou(self) -> torch.Tensor:
        """IoU per base class; NaN for classes without target pixels (the reference logs None)."""
        n = self.num_classes
        iou = self._sums[:n] / (self._sums[n:2 * n] + EPS)
        return torch.where(self._sums[2 * n:] > 0, iou, torch.full_like(iou, float("nan")))

    def miou(self) -> float:
        """Sum of IoUs over (n - classes with no target pixels), as the reference.

        Such classes have zero intersection, so they add 0 to the sum and are only dropped from
        the count: this is the mean over classes that appear. NaN when none appears.
        """
        iou = self.class_iou()
        present = ~iou.isnan()
        if not present.any():
            return float("nan")
        return (iou[present].sum() / present.sum()).item()
