"""Load released weight files into our models, strictly, with errors that say what is wrong.

Three formats: meta-model checkpoints (MSANet / BAM / EFTNet), PSPNet base-learner
``best.pth`` files and the ImageNet backbones of the semseg code base (torchvision format for
VGG16-BN). Every file is read on the CPU with ``weights_only=True`` and copied into the model
on its own device by ``load_state_dict`` (which also converts e.g. float16 storage).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from model.backbones import MOBILENET_STAGES, VGG_STAGES
from util.config import ConfigError, backbone_name, repo_path
from util.errors import ProjectError

BACKBONE_PREFIXES = tuple(f"layer{i}." for i in range(5))
PSPNET_REMAP = {"ppm.": "learner_base.0.", "cls.": "learner_base.1."}
RESNET_STEM = {"conv1": "layer0.0", "bn1": "layer0.1", "conv2": "layer0.3", "bn2": "layer0.4",
               "conv3": "layer0.6", "bn3": "layer0.7"}
FEATURE_STAGES = {"vgg": VGG_STAGES, "mobilenetv2": MOBILENET_STAGES}  # torchvision ``features.N``
DATASET_OF_BASE_CLASSES = {15: "PASCAL-5i", 60: "COCO-20i"}
SHOWN = 8  # keys listed per kind of mismatch
WHERE_TO_GET = {"checkpoint": "weights/README.md says which released files go where",
                "PSPNet file": "initmodel/README.md says where the PSPNet files go",
                "ImageNet backbone file": "initmodel/README.md says where the ImageNet files go"}


class CheckpointError(ProjectError, ValueError):
    """A weight file cannot be read, holds no state_dict or holds non-finite values."""


class CheckpointMismatch(CheckpointError):
    """A weight file's keys or shapes do not fit the model."""


def _read_state(path: str | Path, what: str) -> tuple[dict[str, Tensor], Any]:
    """The file's state_dict with ``module.`` stripped, and its ``epoch`` (None if absent)."""
    path = Path(path)
    if not path.is_file():
        hint = f" ({WHERE_TO_GET[what]})" if what in WHERE_TO_GET else ""
        raise FileNotFoundError(f"{what} not found: {path}{hint}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt archives and foreign pickles raise many different types
        first_line = (str(err).strip().splitlines() or [""])[0]
        raise CheckpointError(f"cannot read {what} {path} ({type(err).__name__}: {first_line})") from err
    wrapped = isinstance(obj, dict) and "state_dict" in obj
    state = obj["state_dict"] if wrapped else obj
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        got = f"a dict with keys {list(obj)[:6]}" if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{what} {path} holds no state_dict: expected a dict of named tensors "
                              f"or {{'state_dict': ...}}, got {got}")
    # A NaN/inf weight gives empty predictions and a table of zeros that looks like a result.
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{what} {path} holds non-finite values (NaN or inf) in {len(bad)} tensors "
                              f"({', '.join(bad[:SHOWN])}{', ...' if len(bad) > SHOWN else ''}): the file is "
                              "corrupt or comes from a diverged training; use another file")
    return {k.removeprefix("module."): v for k, v in state.items()}, obj.get("epoch") if wrapped else None


def _listing(kind: str, items: list[str]) -> str:
    more = f", ... and {len(items) - SHOWN} more" if len(items) > SHOWN else ""
    return f"\n  {kind} ({len(items)}): " + ", ".join(items[:SHOWN]) + more


def _shot(shapes: dict) -> int:
    return shapes["kshot_rw.0.weight"][1] if "kshot_rw.0.weight" in shapes else 1


def _backbone(shapes: dict) -> str | None:
    """The backbone a state_dict was made with, from layer1's key structure and layer3's depth."""
    if "layer1.0.conv1.weight" in shapes:
        return "resnet101" if "layer3.6.conv1.weight" in shapes else "resnet50"
    if "layer1.0.weight" in shapes:
        return "vgg"
    return "mobilenetv2" if "layer1.0.conv.0.0.weight" in shapes else None


def _arch(shapes: dict) -> str:
    return "MSANet" if any(k.startswith(("gam.", "hyper_final.")) for k in shapes) else "BAM"


def _hints(found: dict, expected: dict) -> list[str]:
    """Likely causes of a mismatch, read off the two key -> shape tables."""
    hints = []
    if any(k.startswith(("ppm.", "cls.", "encoder.")) for k in found):
        hints.append("the file looks like a PSPNet base-learner best.pth (ppm./cls./encoder. keys), not a "
                     "meta-model checkpoint: point `weight`/`weight_path` at the MSANet/BAM checkpoint")
    if "down_query.0.weight" in found and "down_query.0.weight" not in expected:
        hints.append("the file is a meta-model checkpoint (down_query.* keys), not a PSPNet best.pth")
    file_bb, model_bb = _backbone(found), _backbone(expected)
    if file_bb and model_bb and file_bb != model_bb:
        hints.append(f"the file holds a {file_bb} backbone but the model is built with {model_bb}: "
                     "set `layers`/`vgg` (or `backbone`) to match the file")
    if found.get("layer0.0.weight") == (64, 3, 7, 7):
        hints.append("a 7x7 stem is torchvision's ResNet; the deep-stem models need semseg's resnet*_v2.pth")
    file_c, model_c = (s.get("learner_base.1.4.weight", (None,))[0] for s in (found, expected))
    if file_c and model_c and file_c != model_c:
        names = [DATASET_OF_BASE_CLASSES.get(c - 1, "?") for c in (file_c, model_c)]
        hints.append(f"the base learner has {file_c - 1} base classes in the file ({names[0]}) and "
                     f"{model_c - 1} in the model ({names[1]}): check `data_set`/`use_split_coco`")
    if "down_query.0.weight" in found and "down_query.0.weight" in expected:
        if _shot(found) != _shot(expected):
            hints.append(f"the file is a {_shot(found)}-shot checkpoint but the model was built for "
                         f"shot={_shot(expected)}: set `shot` to match, or use the matching weights "
                         "(`weight_5shot` for 5 shots)")
        if _arch(found) != _arch(expected):
            hints.append(f"the file is a {_arch(found)} checkpoint (init_merge input "
                         f"{found.get('init_merge.0.weight', (0, '?'))[1]} channels) but the model is "
                         f"{_arch(expected)}: set `arch` to {_arch(found)}")
    return hints


def _load_checked(model: nn.Module, state: dict[str, Tensor], expected: dict[str, tuple],
                  path: str | Path, what: str) -> None:
    """Copy ``state`` into ``model`` if its keys and shapes are exactly ``expected``; else raise
    one CheckpointMismatch listing every difference. A BN layer without ``num_batches_tracked``
    is accepted, as ``load_state_dict(strict=True)`` does (old files predate that buffer)."""
    found = {k: tuple(v.shape) for k, v in state.items()}

    def absent(key: str) -> bool:
        return key not in found and not (key.endswith(".num_batches_tracked") and
                                         key.rsplit(".", 1)[0] + ".running_mean" in found)

    missing = [k for k in expected if absent(k)]
    unexpected = [k for k in found if k not in expected]
    misshaped = [f"{k} file {list(s)} vs model {list(expected[k])}"
                 for k, s in found.items() if k in expected and s != expected[k]]
    if missing or unexpected or misshaped:
        message = f"{what} {path} does not fit the {type(model).__name__} model"
        for kind, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)):
            if items:
                message += _listing(kind, items)
        message += "".join(f"\n  hint: {h}" for h in _hints(found, expected))
        raise CheckpointMismatch(message)
    model.load_state_dict(state, strict=False)  # complete for ``expected``, checked above


def _shapes(model: nn.Module, prefixes: tuple[str, ...] = ("",)) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith(prefixes)}


def load_weights(model: nn.Module, path: str | Path, *, what: str = "checkpoint") -> dict:
    """Load a released MSANet/BAM/EFTNet checkpoint into ``model``, every key and shape exactly.

    Accepts ``{'epoch', 'state_dict', 'optimizer'}`` (only ``state_dict`` and ``epoch`` are read)
    or a bare state_dict; a ``module.`` prefix (DDP) is stripped and EFTNet's ``sr_*`` keys are
    dropped. Returns ``{'epoch', 'keys', 'dropped'}``. Raises FileNotFoundError, CheckpointError
    (unreadable file) or CheckpointMismatch (keys/shapes, with hints on the usual causes).
    """
    state, epoch = _read_state(path, what)
    kept = {k: v for k, v in state.items() if not k.startswith("sr_")}
    _load_checked(model, kept, _shapes(model), path, what)
    return {"epoch": epoch, "keys": len(kept), "dropped": len(state) - len(kept)}


def load_pspnet(model: nn.Module, path: str | Path) -> None:
    """Load a PSPNet ``best.pth`` into the model's ``layer0..4`` and ``learner_base`` (exactly
    those), mapping ``ppm.* -> learner_base.0.*``, ``cls.* -> learner_base.1.*`` and ignoring the
    ``encoder.*`` aliases of the backbone."""
    state, _ = _read_state(path, "PSPNet file")
    remapped = {}
    for key, value in state.items():
        if key.startswith("encoder."):
            continue
        for old, new in PSPNET_REMAP.items():
            if key.startswith(old):
                key = new + key[len(old):]
        remapped[key] = value
    _load_checked(model, remapped, _shapes(model, BACKBONE_PREFIXES + ("learner_base.",)), path, "PSPNet file")


def _imagenet_key(key: str, backbone: str) -> str | None:
    """The model key of an ImageNet-file key, or None for parts the model has no use for."""
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


def load_imagenet_backbone(model: nn.Module, path: str | Path, backbone: str) -> None:
    """Load ImageNet weights into ``layer0..4``: semseg ``resnet{50,101}_v2.pth`` (stem
    conv/bn 1-3 -> layer0, fc dropped) or torchvision ``vgg16_bn.pth`` / ``mobilenet_v2`` files
    (``features.N`` -> the stage holding N, re-indexed; classifier dropped). Optional: a full
    meta checkpoint overwrites all of it."""
    if backbone not in FEATURE_STAGES and backbone not in ("resnet50", "resnet101"):
        raise ValueError(f"unknown backbone {backbone!r}: expected resnet50, resnet101, {', '.join(FEATURE_STAGES)}")
    state, _ = _read_state(path, "ImageNet backbone file")
    mapped = {new: v for k, v in state.items() if (new := _imagenet_key(k, backbone)) is not None}
    _load_checked(model, mapped, _shapes(model, BACKBONE_PREFIXES), path, "ImageNet backbone file")


def checkpoint_path(cfg) -> Path:
    """``cfg.weight_path`` if set, else ``{weights_root}/{data_set}/split{split}/{backbone}/{weight}``
    (relative paths against the repository; an absolute ``weight`` is used as it is)."""
    if cfg.weight_path:
        return repo_path(cfg.weight_path)
    if not cfg.weight:
        raise ConfigError(f"no checkpoint configured: set `weight` (a file under {cfg.weights_root}/"
                         f"{cfg.data_set}/split{cfg.split}/{backbone_name(cfg)}/) or `weight_path`")
    return repo_path(cfg.weights_root) / cfg.data_set / f"split{cfg.split}" / backbone_name(cfg) / cfg.weight


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (read in chunks: released checkpoints are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
