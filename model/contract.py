"""Checks of the public API's inputs (README.md, "Public API") against its tensor contract.

``FewShotModel.forward`` and ``EFTNet.adapt`` call these first, so that an input outside
the contract ends in one ``ValueError`` naming the argument, what it got and what is
expected, before any feature is computed; nothing that would change the numbers passes.

The contract, with B the batch, K the shots and S the (square) image side:

- ``query_img`` [B, 3, S, S] and ``support_imgs`` [B, K, 3, S, S]: torch tensors of the
  model's floating dtype (float32), normalised RGB;
- ``support_masks`` [B, K, S, S] and ``query_mask`` [B, S, S]: an integer dtype with the
  values 0 (background), 1 (foreground) and 255 (ignore) only. A support mask without any
  foreground (all 0, or all 255, which reads as background) passes, as the reference runs it:
  that support's masked features are all zero, so is its prototype (their sum divided by the
  area + 0.0005), and EFTNet's s2q scores it 0 in every round (there is no foreground to
  re-segment), so with one shot every round ties and the last round is the answer. Such an
  episode measures nothing; meta_test.py never builds one (the support lists hold only images
  that show the class, and episode files are checked for it);
- ``padding`` [B, S, S]: bool, True on the padded canvas;
- K is 1 or the model's ``shot`` (the k-shot weights are built for that many shots);
- every tensor on the model's device.

The checks read shapes, dtypes and devices, plus one comparison pass over each mask; the
values of a bad mask are only gathered to write the message.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

IGNORE = 255  # the label value of void pixels and of the padded canvas, in masks and label maps
MASK_VALUES = (0, 1, IGNORE)
MASK_MEANING = "0 = background, 1 = foreground, 255 = ignore"
SHOWN_VALUES = 10


def check_forward_inputs(model: nn.Module, query_img: Any, support_imgs: Any, support_masks: Any) -> None:
    """Refuse inputs of ``model(query_img, support_imgs, support_masks)`` outside the contract."""
    _check_episode(model, query_img, support_imgs, support_masks, padding=None, query_mask=None)


def check_adapt_inputs(model: nn.Module, query_img: Any, support_imgs: Any, support_masks: Any,
                       padding: Any = None, query_mask: Any = None) -> None:
    """Refuse inputs of ``EFTNet(model, cfg).adapt(...)`` outside the contract; ``padding`` and
    ``query_mask`` are checked when given."""
    _check_episode(model, query_img, support_imgs, support_masks, padding, query_mask)


# ---- the shared checks ------------------------------------------------------------------------
def _check_episode(model: nn.Module, query_img: Any, support_imgs: Any, support_masks: Any,
                   padding: Any, query_mask: Any) -> None:
    given = {"query_img": query_img, "support_imgs": support_imgs, "support_masks": support_masks}
    given.update({name: value for name, value in (("padding", padding), ("query_mask", query_mask))
                  if value is not None})
    for name, value in given.items():
        _require_tensor(name, value)
    masks = {name: given[name] for name in ("support_masks", "query_mask") if name in given}

    # shapes: the query fixes B and S, the supports fix K
    if query_img.dim() != 4 or query_img.shape[1] != 3 or query_img.shape[2] != query_img.shape[3]:
        raise ValueError(f"query_img: expected [B, 3, S, S] (square, RGB), got {_shape(query_img)}")
    batch, size = query_img.shape[0], query_img.shape[-1]
    if support_imgs.dim() != 5 or support_imgs.shape[2] != 3:
        raise ValueError(f"support_imgs: expected [B, K, 3, S, S], got {_shape(support_imgs)}")
    shots = support_imgs.shape[1]
    model_shot = getattr(model, "shot", None)
    if model_shot is not None and shots not in (1, model_shot):
        allowed = "K = 1 support" if model_shot == 1 else f"K = 1 or K = {model_shot} supports"
        raise ValueError(f"support_imgs: expected {allowed} (the model was built with shot = {model_shot}), "
                         f"got K = {shots} ({_shape(support_imgs)})")
    _require_shape("support_imgs", support_imgs, (batch, shots, 3, size, size), "[B, K, 3, S, S]",
                   "B, S from query_img")
    _require_shape("support_masks", support_masks, (batch, shots, size, size), "[B, K, S, S]",
                   "B, S from query_img, K from support_imgs")
    for name in ("padding", "query_mask"):
        if name in given:
            _require_shape(name, given[name], (batch, size, size), "[B, S, S]", "B, S from query_img")

    # dtypes
    float_dtype, device = _model_dtype_device(model)
    for name in ("query_img", "support_imgs"):
        if given[name].dtype != float_dtype:
            raise ValueError(f"{name}: expected {_dtype(float_dtype)} (the model's dtype), got "
                             f"{_dtype(given[name].dtype)} ({_image_hint(given[name].dtype, float_dtype)})")
    for name, mask in masks.items():
        if not _is_integer(mask):
            raise ValueError(f"{name}: expected an integer dtype (int64 or uint8) with values in "
                             f"{_value_set()} ({MASK_MEANING}), got {_dtype(mask.dtype)} with values "
                             f"{_values(mask)} (call .long() if they are all 0, 1 or 255)")
    if padding is not None and padding.dtype != torch.bool:
        raise ValueError(f"padding: expected bool (True on the padded canvas), got {_dtype(padding.dtype)} "
                         f"with values {_values(padding)} (call .bool() if it is 0/1)")

    # devices
    owner = "the model's device" if device is not None else "query_img's device"
    device = device if device is not None else query_img.device
    for name, value in given.items():
        if value.device != device:
            raise ValueError(f"{name}: expected a tensor on {device} ({owner}), got one on {value.device} "
                             f"(call .to({str(device)!r}))")

    # mask values: one comparison pass each; the distinct values only for the message
    for name, mask in masks.items():
        _require_mask_values(name, mask)


def _require_tensor(name: str, value: Any) -> None:
    if isinstance(value, Tensor):
        return
    kind = type(value)
    kind_name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    hint = " (use torch.from_numpy(...))" if kind.__module__.split(".")[0] == "numpy" else ""
    raise ValueError(f"{name}: expected a torch.Tensor, got {kind_name}{hint}")


def _require_shape(name: str, value: Tensor, expected: tuple[int, ...], layout: str, source: str) -> None:
    if tuple(value.shape) != expected:
        raise ValueError(f"{name}: expected {layout} = {list(expected)} ({source}), got {_shape(value)}")


def _require_mask_values(name: str, mask: Tensor) -> None:
    bad = mask != MASK_VALUES[0]
    for allowed in MASK_VALUES[1:]:
        bad &= mask != allowed
    if bool(bad.any()):
        raise ValueError(f"{name}: expected values in {_value_set()} ({MASK_MEANING}), got values {_values(mask)} "
                         "(from a label map of class ids: (label == class_id).long(), with 255 kept where the label is 255)")


def _model_dtype_device(model: nn.Module) -> tuple[torch.dtype, Optional[torch.device]]:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype, p.device
    return torch.float32, None


def _is_integer(t: Tensor) -> bool:
    return not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool


def _values(t: Tensor) -> str:
    values = torch.unique(t)
    shown = [v.item() for v in values[:SHOWN_VALUES]]
    more = f", ... ({len(values)} distinct)" if len(values) > SHOWN_VALUES else ""
    return "[" + ", ".join(str(v) for v in shown) + more + "]"


def _value_set() -> str:
    return "{" + ", ".join(str(v) for v in MASK_VALUES) + "}"


def _shape(t: Tensor) -> str:
    return str(list(t.shape))


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _image_hint(got: torch.dtype, expected: torch.dtype) -> str:
    if not got.is_floating_point:
        return "images are normalised RGB: convert to float and normalise them as dataset.transforms does"
    return "call " + (".float()" if expected == torch.float32 else f".to(torch.{_dtype(expected)})")
