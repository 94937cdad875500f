"""Checkpoint loading: released key layouts, every released file format, and clear errors.

Models whose weights do not matter are built on the meta device (no memory, no init cost), and
files whose contents do not matter hold broadcast scalars (right shapes, a few bytes each).
"""
from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torchvision.models import resnet50, vgg16_bn

from model import BAM, HSNet, MSANet
from model.backbones import BACKBONES
from model.pspnet import PSPNet
from util.checkpoint import (CheckpointError, CheckpointMismatch, checkpoint_path, load_configured,
                             load_imagenet_backbone, load_pspnet, load_weights, save_base, save_checkpoint,
                             trained_for)
from util.config import load_config
from util.paths import REPO_ROOT

MANIFESTS = Path(__file__).resolve().parents[2] / "shared" / "checkpoint_keys"
MANIFEST_FILES = sorted(MANIFESTS.glob("*.json")) if MANIFESTS.is_dir() else []
BASE_CLASSES = {"pascal": 15, "coco": 60}
SMALL = dict(reduce_dim=32, base_width=32)  # tiny heads on the small backbone: fast, ~6 MB files


@functools.lru_cache(maxsize=None)
def meta_model(arch: str, backbone: str, shot: int = 1, classes: int = 15) -> nn.Module:
    """A full-size model on the meta device: keys and shapes only."""
    with torch.device("meta"):
        return {"msanet": MSANet, "eftnet": MSANet, "bam": BAM}[arch](backbone, shot, classes)


@functools.lru_cache(maxsize=None)
def meta_pspnet(backbone: str, classes: int = 15) -> nn.Module:
    """PSPNet as base training saved it: the backbone also registered as ``encoder``."""
    spec = BACKBONES[backbone]
    with torch.device("meta"):
        net = PSPNet(spec.build(), spec.fea_dim, classes + 1)
    net.encoder = nn.Sequential(net.layer0, net.layer1, net.layer2, net.layer3, net.layer4)
    return net


def shapes(module: nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in module.state_dict().items()}


def scalar_state(state: dict) -> dict:
    """Same keys and shapes, each tensor a distinct broadcast scalar (tiny on disk)."""
    return {k: torch.tensor(i + 1, dtype=v.dtype).expand(v.shape) for i, (k, v) in enumerate(state.items())}


def small_model(arch=MSANet, shot: int = 1, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return arch("mobilenetv2", shot, 15, **SMALL)


def uninitialised(arch, backbone: str) -> nn.Module:
    """A CPU model without the cost of random init (for tests that overwrite what they check)."""
    with torch.device("meta"):
        model = arch(backbone, 1, 15, **SMALL)
    return model.to_empty(device="cpu")


def assert_state_equal(model: nn.Module, expected: dict, prefixes: tuple[str, ...] = ("",)) -> None:
    got = {k: v for k, v in model.state_dict().items() if k.startswith(prefixes)}
    assert got.keys() == {k for k in expected if k.startswith(prefixes)}
    for k, v in got.items():
        assert torch.equal(v.cpu(), expected[k].to(v.dtype)), k


# ---- released key layouts -----------------------------------------------------------------
HSNET_BACKBONES = {"resnet50": "resnet50", "resnet101": "resnet101", "vgg16": "vgg"}  # manifest name -> ours


def hsnet_release_shapes(backbone: str) -> dict[str, list[int]]:
    """Keys and shapes of a released HSNet file as the model expects it: ``module.``-prefixed
    (DataParallel), the ImageNet head it does not build included."""
    with torch.device("meta"):  # VGG16's head alone would take 400 MB
        model = HSNet(backbone)
    keys = {**shapes(model), **{k: list(v) for k, v in model.unused_checkpoint_keys().items()}}
    return {f"module.{k}": v for k, v in keys.items()}


@pytest.mark.parametrize("manifest", MANIFEST_FILES or [pytest.param(
    None, marks=pytest.mark.skip(reason=f"no manifests at {MANIFESTS} (the shared/ folder beside the repository)"))],
    ids=lambda p: p.stem if p else "none")
def test_models_match_released_manifests(manifest):
    expected = json.loads(manifest.read_text())
    name = re.fullmatch(r"(msanet|eftnet|bam)_(pascal|coco)_(\w+)_(\d)shot|pspnet_(pascal|coco)_(\w+)|hsnet_(\w+)",
                        manifest.stem)
    assert name, f"unexpected manifest name {manifest.name}"
    arch, data_set, backbone, shot, psp_set, psp_backbone, hsnet_backbone = name.groups()
    if hsnet_backbone:
        assert hsnet_release_shapes(HSNET_BACKBONES[hsnet_backbone]) == expected
        return
    if arch:
        model = meta_model(arch, backbone, int(shot), BASE_CLASSES[data_set])
    else:
        model = meta_pspnet(psp_backbone, BASE_CLASSES[psp_set])
    assert shapes(model) == expected


# ---- meta checkpoints in every released format ---------------------------------------------
def test_ddp_checkpoint_with_optimizer_and_epoch(tmp_path):
    source = small_model(seed=1)
    optimizer = torch.optim.SGD(source.parameters(), lr=0.1, momentum=0.9)
    sum(p.sum() for p in source.parameters() if p.is_floating_point()).backward()
    optimizer.step()
    path = tmp_path / "train_epoch_47.5_0.4926.pth"
    torch.save({"epoch": 47.5, "state_dict": {f"module.{k}": v for k, v in source.state_dict().items()},
                "optimizer": optimizer.state_dict()}, path)
    target = small_model(seed=2)
    info = load_weights(target, path)
    assert info == {"epoch": 47.5, "keys": len(source.state_dict()), "dropped": 0}
    assert_state_equal(target, source.state_dict())


def hsnet_release(path: Path, seed: int, head_rows: int = 1000) -> dict:
    """An HSNet ResNet-50 file as released: DataParallel keys, the ImageNet ``fc`` kept; returns its state."""
    torch.manual_seed(seed)
    state = dict(HSNet("resnet50").state_dict())
    state.update({"backbone.fc.weight": torch.randn(head_rows, 2048), "backbone.fc.bias": torch.randn(head_rows)})
    torch.save({"epoch": 35, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    return state


def test_hsnet_release_loads_every_key_and_drops_the_unused_head(tmp_path):
    state = hsnet_release(tmp_path / "best_model.pt", seed=1)
    target = HSNet("resnet50")
    info = load_weights(target, tmp_path / "best_model.pt")
    assert info["epoch"] == 35 and info["keys"] == len(state)
    assert_state_equal(target, {k: v for k, v in state.items() if not k.startswith("backbone.fc.")})


def test_hsnet_release_with_a_wrong_head_or_into_another_arch_refuses(tmp_path):
    hsnet_release(tmp_path / "odd_head.pt", seed=1, head_rows=10)
    with pytest.raises(CheckpointMismatch, match=re.escape("wrong shape (2): backbone.fc.weight file [10, 2048] vs model [1000, 2048]")):
        load_weights(HSNet("resnet50"), tmp_path / "odd_head.pt")
    hsnet_release(tmp_path / "best_model.pt", seed=1)
    with pytest.raises(CheckpointMismatch, match="the file is a checkpoint of HSNet, but the model is MSANet: set `arch` to HSNet"):
        load_weights(small_model(seed=2), tmp_path / "best_model.pt")


def test_bare_state_dict_bam_five_shot(tmp_path):
    source = small_model(BAM, shot=5, seed=1)
    torch.save(source.state_dict(), tmp_path / "bare.pth")
    target = small_model(BAM, shot=5, seed=2)
    assert load_weights(target, tmp_path / "bare.pth")["epoch"] is None
    assert_state_equal(target, source.state_dict())


def test_eftnet_sr_keys_are_dropped(tmp_path):
    source = small_model(seed=1)
    state = {f"module.{k}": v for k, v in source.state_dict().items()}
    state.update({"module.sr_head.0.weight": torch.ones(3, 3), "module.sr_head.0.bias": torch.ones(3)})
    torch.save({"epoch": 3, "state_dict": state}, tmp_path / "eftnet.pth")
    target = small_model(seed=2)
    assert load_weights(target, tmp_path / "eftnet.pth")["dropped"] == 2
    assert_state_equal(target, source.state_dict())


def test_float16_storage_loads_into_float32(tmp_path):
    source = small_model(seed=1).half()
    torch.save({"state_dict": source.state_dict()}, tmp_path / "half.pth")
    target = small_model(seed=2)
    load_weights(target, tmp_path / "half.pth")
    assert target.down_query[0].weight.dtype == torch.float32
    assert_state_equal(target, source.state_dict())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_loads_into_a_model_on_the_gpu(tmp_path):
    source = small_model(seed=1)
    torch.save({"state_dict": source.state_dict()}, tmp_path / "ckpt.pth")
    target = small_model(seed=2).cuda()
    load_weights(target, tmp_path / "ckpt.pth")
    assert target.cls_meta[3].weight.is_cuda
    assert_state_equal(target, source.state_dict())


# ---- mismatches name the keys and the likely cause -----------------------------------------
def mismatch(tmp_path, file_model: nn.Module, model: nn.Module) -> str:
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in scalar_state(file_model.state_dict()).items()},
                "optimizer": {}}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointMismatch) as err:
        load_weights(model, tmp_path / "bad.pth")
    message = str(err.value)
    assert str(tmp_path / "bad.pth") in message
    return message


def test_one_shot_file_into_five_shot_model(tmp_path):
    message = mismatch(tmp_path, meta_model("msanet", "resnet50", 1), meta_model("msanet", "resnet50", 5))
    assert "missing (4): kshot_rw.0.weight" in message and "unexpected" not in message
    assert "1-shot checkpoint but the model was built for shot=5" in message


def test_five_shot_file_into_one_shot_model(tmp_path):
    message = mismatch(tmp_path, meta_model("msanet", "vgg", 5), meta_model("msanet", "vgg", 1))
    assert "unexpected (4): kshot_rw.0.weight" in message
    assert "5-shot checkpoint but the model was built for shot=1" in message


def test_vgg_file_into_resnet_model_and_reverse(tmp_path):
    message = mismatch(tmp_path, meta_model("msanet", "vgg"), meta_model("msanet", "resnet50"))
    assert "learner_base.0.features.0.1.weight file [128, 512, 1, 1] vs model [512, 2048, 1, 1]" in message
    assert "missing (318): layer0.6.weight" in message and "... and 310 more" in message  # long lists are cut
    assert "vgg backbone but the model is built with resnet50" in message
    message = mismatch(tmp_path, meta_model("bam", "resnet101"), meta_model("bam", "vgg"))
    assert "resnet101 backbone but the model is built with vgg" in message


def test_coco_base_learner_into_pascal_model(tmp_path):
    message = mismatch(tmp_path, meta_model("msanet", "resnet50", classes=60), meta_model("msanet", "resnet50"))
    assert "wrong shape (2): learner_base.1.4.weight file [61, 512, 1, 1] vs model [16, 512, 1, 1]" in message
    assert "60 base classes in the file (COCO-20i) and 15 in the model (PASCAL-5i)" in message
    assert "missing" not in message and "unexpected" not in message


def test_bam_file_into_msanet_model_and_reverse(tmp_path):
    message = mismatch(tmp_path, meta_model("bam", "resnet50"), meta_model("msanet", "resnet50"))
    assert "missing (11): gam.gate.0.weight" in message
    assert "init_merge.0.weight file [256, 513, 1, 1] vs model [256, 833, 1, 1]" in message
    assert "BAM checkpoint (init_merge input 513 channels) but the model is MSANet: set `arch` to BAM" in message
    message = mismatch(tmp_path, meta_model("msanet", "vgg"), meta_model("bam", "vgg"))
    assert "MSANet checkpoint (init_merge input 833 channels) but the model is BAM" in message


def test_pspnet_file_given_as_meta_checkpoint(tmp_path):
    message = mismatch(tmp_path, meta_pspnet("vgg"), meta_model("msanet", "vgg"))
    assert "PSPNet base-learner best.pth" in message


def test_missing_file_never_falls_back_to_random_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope.pth"))):
        load_weights(meta_model("msanet", "vgg"), tmp_path / "nope.pth")


def test_corrupt_or_foreign_files_are_named(tmp_path):
    model = small_model()
    torch.save({"state_dict": model.state_dict()}, tmp_path / "full.pth")
    cases = {"text.pth": b"not a checkpoint", "truncated.pth": (tmp_path / "full.pth").read_bytes()[:4096]}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    torch.save(nn.Linear(2, 2), tmp_path / "pickled_module.pth")  # needs unpickling code: refused
    for name in [*cases, "pickled_module.pth"]:
        with pytest.raises(CheckpointError, match=re.escape(f"cannot read checkpoint {tmp_path / name}")):
            load_weights(model, tmp_path / name)
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="holds no state_dict.*got list"):
        load_weights(model, tmp_path / "list.pth")
    torch.save({"epoch": 1, "model": model.state_dict()}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match=re.escape("got a dict with keys ['epoch', 'model']")):
        load_weights(model, tmp_path / "other.pth")


# ---- PSPNet base learner ---------------------------------------------------------------------
def small_pspnet_file(tmp_path) -> tuple[Path, dict]:
    torch.manual_seed(3)
    spec = BACKBONES["mobilenetv2"]
    net = PSPNet(spec.build(), spec.fea_dim, 16, width=SMALL["base_width"])
    net.encoder = nn.Sequential(net.layer0, net.layer1, net.layer2, net.layer3, net.layer4)
    state = net.state_dict()
    assert any(k.startswith("encoder.") for k in state)
    path = tmp_path / "best.pth"
    torch.save({"epoch": 100, "state_dict": {f"module.{k}": v for k, v in state.items()}, "optimizer": {}}, path)
    return path, state


def test_pspnet_fills_backbone_and_base_learner_only(tmp_path):
    path, psp = small_pspnet_file(tmp_path)
    model = small_model(seed=4)
    head_before = model.down_query[0].weight.clone()
    load_pspnet(model, path)
    assert torch.equal(model.learner_base[0].features[2][1].weight, psp["ppm.features.2.1.weight"])
    assert torch.equal(model.learner_base[1][4].bias, psp["cls.4.bias"])
    assert torch.equal(model.down_query[0].weight, head_before)
    remapped = {k.replace("ppm.", "learner_base.0.", 1).replace("cls.", "learner_base.1.", 1): v
                for k, v in psp.items() if not k.startswith("encoder.")}
    assert_state_equal(model, remapped, ("layer", "learner_base."))


def test_meta_checkpoint_backbone_equals_its_pspnet(tmp_path):
    path, _ = small_pspnet_file(tmp_path)
    from_pspnet = small_model(seed=5)
    load_pspnet(from_pspnet, path)
    torch.save({"epoch": 50, "state_dict": from_pspnet.state_dict()}, tmp_path / "msanet.pth")
    from_meta = small_model(seed=6)
    load_weights(from_meta, tmp_path / "msanet.pth")
    assert_state_equal(from_meta, from_pspnet.state_dict(), ("layer", "learner_base."))


def test_pspnet_mismatches(tmp_path):
    torch.save({"state_dict": scalar_state(meta_pspnet("resnet50", 60).state_dict())}, tmp_path / "coco.pth")
    with pytest.raises(CheckpointMismatch, match=r"wrong shape \(2\): learner_base\.1\.4\.weight") as err:
        load_pspnet(meta_model("msanet", "resnet50"), tmp_path / "coco.pth")
    assert "(COCO-20i)" in str(err.value) and "PSPNet file" in str(err.value)
    torch.save(scalar_state(meta_model("bam", "vgg").state_dict()), tmp_path / "meta.pth")
    with pytest.raises(CheckpointMismatch, match="meta-model checkpoint .*not a PSPNet best.pth"):
        load_pspnet(meta_model("bam", "vgg"), tmp_path / "meta.pth")


# ---- ImageNet backbones ----------------------------------------------------------------------
def test_semseg_resnet_file_maps_stem_and_drops_fc(tmp_path):
    model = uninitialised(MSANet, "resnet50")
    backbone = {k: v for k, v in model.state_dict().items() if k.startswith("layer")}
    stem = {"0": "conv1", "1": "bn1", "3": "conv2", "4": "bn2", "6": "conv3", "7": "bn3"}
    names = {k: f"{stem[k.split('.')[1]]}.{k.split('.', 2)[2]}" if k.startswith("layer0.") else k for k in backbone}
    state = scalar_state({names[k]: v for k, v in backbone.items()})
    state.update({"fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)})
    torch.save(state, tmp_path / "resnet50_v2.pth")
    load_imagenet_backbone(model, tmp_path / "resnet50_v2.pth", "resnet50")
    assert_state_equal(model, {k: state[names[k]] for k in backbone}, ("layer",))


def test_torchvision_vgg_file_maps_features_to_stages(tmp_path):
    with torch.device("meta"):
        reference = vgg16_bn(weights=None)
    # Files of that age have no num_batches_tracked: torch's strict load accepts that too.
    state = scalar_state({k: v for k, v in reference.state_dict().items() if "num_batches" not in k})
    torch.save(state, tmp_path / "vgg16_bn.pth")
    model = uninitialised(MSANet, "vgg")
    load_imagenet_backbone(model, tmp_path / "vgg16_bn.pth", "vgg")
    assert torch.equal(model.layer0[4].running_var, state["features.4.running_var"])
    assert torch.equal(model.layer1[0].weight, state["features.7.weight"])
    assert torch.equal(model.layer2[7].bias, state["features.21.bias"])
    assert torch.equal(model.layer4[6].weight, state["features.40.weight"])
    loaded = {v.flatten()[0].item() for k, v in model.state_dict().items()
              if k.startswith("layer") and "num_batches" not in k}
    assert loaded == {v.flatten()[0].item() for k, v in state.items() if k.startswith("features.")}


def test_torchvision_resnet_is_refused_with_hint(tmp_path):
    with torch.device("meta"):
        reference = resnet50(weights=None)
    torch.save(scalar_state(reference.state_dict()), tmp_path / "resnet50-tv.pth")
    with pytest.raises(CheckpointMismatch, match=r"layer0\.0\.weight file \[64, 3, 7, 7\]") as err:
        load_imagenet_backbone(meta_model("msanet", "resnet50"), tmp_path / "resnet50-tv.pth", "resnet50")
    assert "torchvision's ResNet" in str(err.value) and "missing (12): layer0.3.weight" in str(err.value)
    with pytest.raises(ValueError, match=r"backbone 'resnet18' is not the model's \('resnet50'\)"):
        load_imagenet_backbone(meta_model("msanet", "resnet50"), tmp_path / "resnet50-tv.pth", "resnet18")


# ---- where the checkpoint is looked up ---------------------------------------------------
def test_checkpoint_path_from_config(tmp_path):
    cfg = load_config(REPO_ROOT / "config/pascal/pascal_split0_resnet50.yaml")
    assert checkpoint_path(cfg) == REPO_ROOT / "weights/pascal/split0/resnet50" / cfg.weight
    vgg5 = load_config(REPO_ROOT / "config/pascal/pascal_split0_vgg.yaml", ["shot", "5"])
    assert checkpoint_path(vgg5) == REPO_ROOT / "weights/pascal/split0/vgg/vgg_5_0_0.6886.pth"
    explicit = load_config(REPO_ROOT / "config/pascal/pascal_split0_vgg.yaml", ["weight_path", str(tmp_path / "x.pth")])
    assert checkpoint_path(explicit) == tmp_path / "x.pth"
    relative = load_config(REPO_ROOT / "config/pascal/pascal_split0_vgg.yaml", ["weight_path", "exp/x.pth"])
    assert checkpoint_path(relative) == REPO_ROOT / "exp/x.pth"
    unset = load_config(REPO_ROOT / "config/coco/coco_split1_vgg.yaml", ["weight", "''"])
    with pytest.raises(ValueError, match=r"set `weight` \(a file under weights/coco/split1/vgg/\)"):
        checkpoint_path(unset)


# ---- a base file shared by a fold's checkpoints (the demo models) ---------------------------------
@pytest.mark.parametrize("arch, shot", [(MSANet, 1), (BAM, 5)])
def test_base_file_and_meta_only_checkpoint_restore_the_model(tmp_path, arch, shot):
    trained = small_model(arch, shot, seed=7)
    cfg = SimpleNamespace(weight_path=str(tmp_path / "meta.pth"), base_weight="base.pth", weights_root=str(tmp_path),
                          data_set="demo", split=0, backbone="mobilenetv2", vgg=False, layers=50,
                          arch=arch.__name__, shot=shot)
    novel = [1, 2, 3, 4, 5]
    save_base(trained, tmp_path / "base.pth", 20, trained_for(cfg, novel, with_model=False))
    save_checkpoint(trained, tmp_path / "meta.pth", 4, trained_for(cfg, novel), without_base=True)
    base = torch.load(tmp_path / "base.pth", weights_only=True)["state_dict"]
    meta = torch.load(tmp_path / "meta.pth", weights_only=True)["state_dict"]
    # The base file is PSPNet's layout (what load_pspnet reads); the checkpoint holds the rest.
    assert {k.split(".")[0] for k in base} == {"layer0", "layer1", "layer2", "layer3", "layer4", "ppm", "cls"}
    assert not any(k.startswith(("layer", "learner_base.")) for k in meta) and "down_query.0.weight" in meta
    assert all(v.dtype == torch.float16 for v in (*base.values(), *meta.values()) if v.is_floating_point())
    (tmp_path / "demo/split0/mobilenetv2").mkdir(parents=True)
    (tmp_path / "base.pth").rename(tmp_path / "demo/split0/mobilenetv2/base.pth")
    restored = small_model(arch, shot, seed=8)
    info = load_configured(restored, cfg, novel)
    assert info["epoch"] == 4
    half = {k: v.half().float() if v.is_floating_point() else v for k, v in trained.state_dict().items()}
    assert_state_equal(restored, half)
    # A checkpoint that holds everything does not fit a config with a base file, and the reverse.
    save_checkpoint(trained, tmp_path / "full.pth", 4, trained_for(cfg, novel))
    with pytest.raises(CheckpointMismatch, match=r"unexpected \(\d+\): layer0"):
        load_configured(restored, SimpleNamespace(**{**vars(cfg), "weight_path": str(tmp_path / "full.pth")}), novel)
    with pytest.raises(CheckpointMismatch, match=r"missing \(\d+\): layer0"):
        load_weights(restored, tmp_path / "meta.pth")
