"""The public API refuses inputs outside its tensor contract (model/contract.py).

Every bad input ends in one ValueError that names the argument, shows the offending shape,
dtype or values and says what is expected, before any feature is computed (the model's
``extract`` and ``match`` are patched to fail). Valid inputs of the contract's dtypes pass
and run. A two-shot MobileNetV2 MSANet at 33 px keeps this fast.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model import MSANet
from model.contract import check_adapt_inputs, check_forward_inputs
from model.eftnet import EFTNet, EFTNetSettings

SIZE = 33
SHOT = 2


def make_inputs() -> dict:
    """One valid episode: query [1,3,S,S], supports [1,2,3,S,S], int64 masks with 0/1/255,
    bool padding on the last rows, an int64 query mask."""
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(1, SHOT, SIZE, SIZE, dtype=torch.long)
    masks[:, :, 8:20, 10:24] = 1
    masks[:, :, -3:] = 255
    padding = torch.zeros(1, SIZE, SIZE, dtype=torch.bool)
    padding[:, -3:] = True
    query_mask = torch.zeros(1, SIZE, SIZE, dtype=torch.long)
    query_mask[:, 5:15, 5:15] = 1
    return dict(query_img=torch.randn(1, 3, SIZE, SIZE, generator=g),
                support_imgs=torch.randn(1, SHOT, 3, SIZE, SIZE, generator=g),
                support_masks=masks, padding=padding, query_mask=query_mask.masked_fill(padding, 255))


def make_settings(**overrides) -> EFTNetSettings:
    return EFTNetSettings(**dict(dict(rounds=2, base_lr=0.001), **overrides))


@pytest.fixture(scope="module")
def model() -> MSANet:
    torch.manual_seed(0)
    return MSANet("mobilenetv2", SHOT, 15, reduce_dim=16, base_width=16).eval()


@pytest.fixture
def no_work(model, monkeypatch) -> MSANet:
    """The model, with every step that computes something made to fail."""
    def fail(*args, **kwargs):
        raise AssertionError("the inputs were not refused before the model started working")
    for step in ("extract", "match", "embed", "decode"):
        monkeypatch.setattr(model, step, fail)
    return model


def edit(name: str, change: Callable) -> Callable[[dict], dict]:
    def apply(inputs: dict) -> dict:
        return {**inputs, name: change(inputs[name])}
    return apply


def masks_with(values: Callable) -> Callable:
    """The masks with their foreground (1) replaced by ``values(foreground_mask, masks)``."""
    return lambda m: values(m == 1, m)


# (case id, argument changed, change, fragments the message must hold besides the argument)
# ---- cases for both entries: query_img, support_imgs, support_masks
COMMON = [
    # support masks whose foreground is not 1
    ("mask-class-id", "support_masks", masks_with(lambda fg, m: m.masked_fill(fg, 15)),
     ["values [0, 15, 255]", "{0, 1, 255}", "1 = foreground", "(label == class_id)"]),
    ("mask-foreground-2", "support_masks", masks_with(lambda fg, m: m.masked_fill(fg, 2)),
     ["values [0, 2, 255]", "{0, 1, 255}"]),
    ("mask-negative", "support_masks", lambda m: m.masked_fill(m == 255, -1), ["values [-1, 0, 1]"]),
    ("mask-float-half", "support_masks", masks_with(lambda fg, m: (m * 0).float().masked_fill(fg, 0.5)),
     ["integer dtype", "float32", "[0.0, 0.5]"]),
    ("mask-float-binary", "support_masks", lambda m: m.float(), ["integer dtype", "float32", ".long()"]),
    ("mask-float64", "support_masks", lambda m: m.double(), ["integer dtype", "float64"]),
    ("mask-bool", "support_masks", lambda m: m == 1, ["integer dtype", "bool"]),
    # masks of another size than the images, or another layout
    ("mask-smaller", "support_masks", lambda m: m[..., :31, :31], ["[1, 2, 31, 31]", "[1, 2, 33, 33]"]),
    ("mask-one-shot", "support_masks", lambda m: m[:, :1], ["[1, 1, 33, 33]", "[1, 2, 33, 33]"]),
    ("mask-no-shot-axis", "support_masks", lambda m: m[:, 0], ["[1, 33, 33]", "[B, K, S, S]"]),
    ("mask-channel-axis", "support_masks", lambda m: m[:, :, None], ["[1, 2, 1, 33, 33]", "[B, K, S, S]"]),
    # supports of another size than the query
    ("supports-smaller", "support_imgs", lambda s: s[..., :31, :31],
     ["[1, 2, 3, 31, 31]", "[1, 2, 3, 33, 33]", "[B, K, 3, S, S]"]),
    ("supports-larger", "support_imgs", lambda s: F.pad(s, (0, 2, 0, 2)), ["[1, 2, 3, 35, 35]"]),
    ("supports-other-batch", "support_imgs", lambda s: s.expand(2, -1, -1, -1, -1), ["[2, 2, 3, 33, 33]"]),
    ("supports-no-shot-axis", "support_imgs", lambda s: s[:, 0], ["[1, 3, 33, 33]", "[B, K, 3, S, S]"]),
    ("supports-three-shots", "support_imgs", lambda s: torch.cat([s, s[:, :1]], 1),
     ["[1, 3, 3, 33, 33]", "K = 1 or K = 2", "got K = 3"]),
    # wrong channel counts and layouts
    ("query-grey", "query_img", lambda q: q[:, :1], ["[1, 1, 33, 33]", "[B, 3, S, S]"]),
    ("query-rgba", "query_img", lambda q: torch.cat([q, q[:, :1]], 1), ["[1, 4, 33, 33]", "[B, 3, S, S]"]),
    ("query-channels-last", "query_img", lambda q: q.permute(0, 2, 3, 1), ["[1, 33, 33, 3]", "[B, 3, S, S]"]),
    ("query-no-batch", "query_img", lambda q: q[0], ["[3, 33, 33]", "[B, 3, S, S]"]),
    ("query-not-square", "query_img", lambda q: q[..., :31], ["[1, 3, 33, 31]", "square"]),
    ("supports-grey", "support_imgs", lambda s: s[:, :, :1], ["[1, 2, 1, 33, 33]", "[B, K, 3, S, S]"]),
    # numpy, lists and other dtypes
    ("query-numpy", "query_img", lambda q: q.numpy(), ["torch.Tensor", "numpy.ndarray", "torch.from_numpy"]),
    ("supports-numpy", "support_imgs", lambda s: s.numpy(), ["torch.Tensor", "numpy.ndarray"]),
    ("masks-numpy", "support_masks", lambda m: m.numpy(), ["torch.Tensor", "numpy.ndarray"]),
    ("query-list", "query_img", lambda q: q.tolist(), ["torch.Tensor", "got list"]),
    ("query-float64", "query_img", lambda q: q.double(), ["expected float32", "got float64", ".float()"]),
    ("supports-float64", "support_imgs", lambda s: s.double(), ["expected float32", "got float64", ".float()"]),
    ("query-float16", "query_img", lambda q: q.half(), ["expected float32", "got float16"]),
    ("query-uint8", "query_img", lambda q: (q * 0).to(torch.uint8), ["expected float32", "got uint8", "normalise"]),
    # another device than the model's
    ("query-other-device", "query_img", lambda q: q.to("meta"), ["cpu", "meta", "device"]),
    ("masks-other-device", "support_masks", lambda m: m.to("meta"), ["cpu", "meta", "device"]),
]

# ---- cases for EFTNet.adapt only: padding and query_mask
ADAPT_ONLY = [
    ("padding-smaller", "padding", lambda p: p[:, :31, :31], ["[1, 31, 31]", "[1, 33, 33]", "[B, S, S]"]),
    ("padding-no-batch", "padding", lambda p: p[0], ["[33, 33]", "[B, S, S]"]),
    ("padding-uint8", "padding", lambda p: p.to(torch.uint8), ["expected bool", "uint8"]),
    ("padding-float", "padding", lambda p: p.float(), ["expected bool", "float32", "[0.0, 1.0]", ".bool()"]),
    ("padding-numpy", "padding", lambda p: p.numpy(), ["torch.Tensor", "numpy.ndarray"]),
    ("query-mask-class-id", "query_mask", masks_with(lambda fg, m: m.masked_fill(fg, 7)),
     ["values [0, 7, 255]", "{0, 1, 255}"]),
    ("query-mask-float", "query_mask", lambda m: m.float(), ["integer dtype", "float32"]),
    ("query-mask-larger", "query_mask", lambda m: m.expand(2, -1, -1), ["[2, 33, 33]", "[1, 33, 33]"]),
]


def call_forward(model, inputs: dict):
    return model(inputs["query_img"], inputs["support_imgs"], inputs["support_masks"])


def call_adapt(model, inputs: dict, **cfg):
    return EFTNet(model, make_settings(**cfg)).adapt(**inputs)


def assert_refused(call: Callable[[], object], name: str, fragments: list[str]) -> None:
    with pytest.raises(ValueError) as caught:
        call()
    message = str(caught.value)
    assert message.startswith(f"{name}: expected "), message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


# ---- bad inputs --------------------------------------------------------------------------------
@pytest.mark.parametrize("case, name, change, fragments", COMMON, ids=[c[0] for c in COMMON])
def test_forward_refuses_before_any_work(no_work, case, name, change, fragments):
    inputs = edit(name, change)(make_inputs())
    assert_refused(lambda: call_forward(no_work, inputs), name, fragments)


@pytest.mark.parametrize("case, name, change, fragments", COMMON + ADAPT_ONLY, ids=[c[0] for c in COMMON + ADAPT_ONLY])
def test_adapt_refuses_before_any_work(no_work, case, name, change, fragments):
    inputs = edit(name, change)(make_inputs())
    assert_refused(lambda: call_adapt(no_work, inputs), name, fragments)


@pytest.mark.parametrize("check", [check_forward_inputs, check_adapt_inputs])
def test_shots_other_than_one_or_the_models(check):
    one_shot = MSANet("mobilenetv2", 1, 15, reduce_dim=16, base_width=16)
    inputs = make_inputs()
    assert_refused(lambda: check(one_shot, *(inputs[k] for k in ("query_img", "support_imgs", "support_masks"))),
                   "support_imgs", ["K = 1 support (", "shot = 1", "got K = 2"])


def test_a_model_of_another_dtype_asks_for_its_dtype():
    inputs = make_inputs()
    half = MSANet("mobilenetv2", SHOT, 15, reduce_dim=16, base_width=16).half()
    assert_refused(lambda: check_forward_inputs(half, inputs["query_img"], inputs["support_imgs"],
                                                inputs["support_masks"]),
                   "query_img", ["expected float16", "got float32", ".to(torch.float16)"])


def test_many_bad_values_are_summarised(no_work):
    inputs = make_inputs()
    inputs["support_masks"] = torch.arange(SIZE * SIZE * SHOT).view(1, SHOT, SIZE, SIZE) % 40
    assert_refused(lambda: call_forward(no_work, inputs), "support_masks",
                   ["values [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, ... (40 distinct)]"])


# ---- valid inputs ------------------------------------------------------------------------------
VALID_MASKS = {
    "int64": lambda m: m,
    "uint8": lambda m: m.to(torch.uint8),
    "int32": lambda m: m.to(torch.int32),
    "all-ignored": lambda m: torch.full_like(m, 255),
    "empty": lambda m: torch.zeros_like(m),
    "non-contiguous": lambda m: m.transpose(-1, -2),
}


@pytest.mark.parametrize("kind", list(VALID_MASKS))
def test_valid_masks_pass(model, kind):
    inputs = edit("support_masks", VALID_MASKS[kind])(make_inputs())
    check_forward_inputs(model, inputs["query_img"], inputs["support_imgs"], inputs["support_masks"])
    check_adapt_inputs(model, **inputs)


def test_valid_inputs_run_through_forward(model):
    inputs = edit("support_masks", lambda m: m.to(torch.uint8))(make_inputs())
    with torch.no_grad():
        pred = call_forward(model, inputs)
        one_shot = call_forward(model, {k: v[:, :1] if k.startswith("support") else v for k, v in inputs.items()})
    assert pred.final.shape == one_shot.final.shape == (1, 2, SIZE, SIZE)
    assert torch.isfinite(pred.final).all()


def test_valid_inputs_run_through_adapt(model):
    inputs = make_inputs()
    res = call_adapt(model, inputs, query_mask_source="ground_truth")
    assert res.final.shape == (1, 2, SIZE, SIZE) and len(res.round_scores) == 2
    uint8 = call_adapt(model, {**inputs, "support_masks": inputs["support_masks"].to(torch.uint8),
                               "query_mask": inputs["query_mask"].to(torch.uint8), "padding": None})
    assert uint8.final.shape == (1, 2, SIZE, SIZE)


def test_numpy_masks_converted_as_documented_pass(model):
    """The hint of the refusal works: torch.from_numpy of an int64 0/1/255 array."""
    masks = np.zeros((1, SHOT, SIZE, SIZE), np.int64)
    masks[..., :4] = 255
    inputs = make_inputs()
    check_forward_inputs(model, inputs["query_img"], inputs["support_imgs"], torch.from_numpy(masks))
