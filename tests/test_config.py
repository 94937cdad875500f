import copy
import pickle
import re
from pathlib import Path

import pytest

from util.config import (SCHEMA, CfgNode, ConfigError, backbone_name,
                         config_summary, load_config)
from util.paths import REPO_ROOT, repo_path

CONFIG_DIR = REPO_ROOT / "config"
BACKBONES = ("vgg", "resnet50", "resnet101")
RELEASE_FILES = sorted(
    CONFIG_DIR / ds / f"{ds}_split{split}_{bb}.yaml"
    for ds in ("pascal", "coco") for split in range(4) for bb in BACKBONES
)


def write_cfg(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


MINIMAL = "Train:\n  split: 1\n  shot: 1\nTest_Finetune:\n  weight: a.pth\n  weight_5shot: b.pth\n"


def test_all_24_release_configs_exist():
    assert len(RELEASE_FILES) == 24
    assert all(p.is_file() for p in RELEASE_FILES)


@pytest.mark.parametrize("path", RELEASE_FILES, ids=lambda p: p.stem)
def test_release_config_values(path: Path):
    ds, split_part, bb = path.stem.split("_")
    split = int(split_part[len("split"):])
    cfg = load_config(path)
    pascal = ds == "pascal"

    assert (cfg.data_set, cfg.split, backbone_name(cfg)) == (ds, split, bb)
    assert cfg.vgg == (bb == "vgg")
    assert cfg.layers == (101 if bb == "resnet101" else 50)
    assert cfg.shot == 1 and cfg.arch == "MSANet" and cfg.s2q_query_mask == "pseudo"
    size = 473 if pascal else 641
    assert (cfg.val_size, cfg.train_h, cfg.train_w) == (size, size, size)
    assert cfg.use_split_coco is (not pascal)
    assert cfg.manual_seed == (123 if pascal else 321)
    assert cfg.sr_aux_weight1 == (0.9 if pascal and bb != "vgg" else 1.0)
    expected_workers = 8
    if ds == "coco" and bb == "resnet50" and split < 3:
        expected_workers = 1 if split == 2 else 0
    assert cfg.workers == expected_workers
    # fine-tuning settings shared by every file
    assert (cfg.loop_ft, cfg.ft_number, cfg.ft_base_lr, cfg.ft_power) == (True, 5, 0.005, 0.9)
    assert cfg.change_weighting == [0.8, 0.2] and cfg.q2s_filt_para == 0.2
    assert (cfg.momentum, cfg.weight_decay) == (0.9, 0.0001)
    assert (cfg.kshot_trans_dim, cfg.zoom_factor) == (2, 8)
    # keys this code does not read: accepted at the values it works with, and reported
    assert {"ignore_label", "classes", "batch_size_val", "resized_val", "ori_resize", "low_fea",
            "ann_type", "resume", "scale_min"} <= set(cfg.ignored_keys)
    assert "ignore_label" not in cfg and "resume" not in cfg
    assert cfg.show == "" and cfg.show_ft == ""
    assert cfg.test_num == 1000 and cfg.num_seeds == 6
    # paths are relative to the repository root
    root = "data/VOCdevkit2012/VOC2012" if pascal else "data/MSCOCO2014"
    assert cfg.data_root == root
    assert "base_data_root" in cfg.ignored_keys  # base labels come from the label maps (dataset/fewshot.py)
    assert cfg.val_list == f"lists/{ds}/val.txt"
    # checkpoint names: {bb}_{split}_{miou}.pth and {bb}_5_{split}_{miou}.pth
    assert re.fullmatch(rf"{bb}_{split}_0\.\d{{4}}\.pth", cfg.weight)
    if (ds, split, bb) == ("pascal", 0, "resnet50"):
        assert cfg.weight_5shot == ""  # not known from the release
    else:
        assert re.fullmatch(rf"{bb}_5_{split}_0\.\d{{4}}\.pth", cfg.weight_5shot)


def test_known_release_names():
    assert load_config(CONFIG_DIR / "pascal/pascal_split0_resnet50.yaml").weight == \
        "resnet50_0_0.6925.pth"
    cfg = load_config(CONFIG_DIR / "coco/coco_split3_resnet101.yaml")
    assert (cfg.weight, cfg.weight_5shot) == ("resnet101_3_0.4809.pth", "resnet101_5_3_0.5702.pth")


def test_missing_keys_take_defaults(tmp_path):
    cfg = load_config(write_cfg(tmp_path, MINIMAL))
    assert cfg.split == 1 and cfg.ft_number == SCHEMA["ft_number"] == 5
    assert set(cfg) == set(SCHEMA)
    assert cfg.device == "auto" and cfg.kshot_order_quirk is True


def test_attribute_and_item_access(tmp_path):
    cfg = load_config(write_cfg(tmp_path, MINIMAL))
    assert isinstance(cfg, CfgNode) and cfg.shot is cfg["shot"]
    cfg.shot = 3
    assert cfg["shot"] == 3
    with pytest.raises(AttributeError):
        _ = cfg.no_such_key
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    clone = copy.deepcopy(cfg)
    clone.change_weighting.append(1.0)
    assert cfg.change_weighting == [0.8, 0.2]


def test_schema_default_list_is_not_shared(tmp_path):
    cfg = load_config(write_cfg(tmp_path, MINIMAL))
    cfg.change_weighting[0] = 0.5
    assert SCHEMA["change_weighting"] == [0.8, 0.2]


def test_unknown_yaml_key_suggests_closest(tmp_path):
    path = write_cfg(tmp_path, "Test_Finetune:\n  ft_numbr: 3\n")
    with pytest.raises(ValueError, match="ft_numbr") as info:
        load_config(path)
    assert "did you mean 'ft_number'" in str(info.value)  # best match first
    assert str(path) in str(info.value) and "Test_Finetune" in str(info.value)


def test_unknown_opts_key_suggests_closest(tmp_path):
    with pytest.raises(ValueError, match=r"'shto' in --opts; did you mean .*'shot'"):
        load_config(write_cfg(tmp_path, MINIMAL), ["shto", "5"])


def test_duplicate_key_across_sections(tmp_path):
    path = write_cfg(tmp_path, "Train:\n  shot: 1\nMethod:\n  shot: 5\n")
    with pytest.raises(ConfigError, match=r"'shot'.*'Train'.*'Method'"):
        load_config(path)


def test_opts_override_and_parse(tmp_path):
    cfg = load_config(write_cfg(tmp_path, MINIMAL), [
        "ft_number", "3", "loop_ft", "False", "change_weighting", "[0.7,0.3]",
        "ft_base_lr", "1e-3", "sr_aux_weight1", "1", "weight_path", "2024", "device", "cuda:1"])
    assert cfg.ft_number == 3 and cfg.loop_ft is False
    assert cfg.change_weighting == [0.7, 0.3]
    assert cfg.ft_base_lr == pytest.approx(0.001)
    assert cfg.sr_aux_weight1 == 1.0 and isinstance(cfg.sr_aux_weight1, float)
    assert cfg.weight_path == "2024" and cfg.device == "cuda:1"


@pytest.mark.parametrize("opts, pattern", [
    (["shot", "1.5"], r"'shot'.*1\.5.*expected int"),
    (["vgg", "1"], r"'vgg'.*expected bool"),
    (["ft_number", "True"], r"'ft_number'.*expected int"),
    (["change_weighting", "0.8"], r"'change_weighting'.*expected list"),
    (["ft_base_lr", "fast"], r"'ft_base_lr'.*'fast'.*expected float"),
])
def test_opts_type_errors(tmp_path, opts, pattern):
    with pytest.raises(ValueError, match=pattern):
        load_config(write_cfg(tmp_path, MINIMAL), opts)


def test_yaml_type_error_names_key(tmp_path):
    with pytest.raises(ValueError, match=r"'loop_ft'.*'yes please'.*expected bool"):
        load_config(write_cfg(tmp_path, "Test_Finetune:\n  loop_ft: yes please\n"))


def test_odd_opts(tmp_path):
    with pytest.raises(ValueError, match="odd"):
        load_config(write_cfg(tmp_path, MINIMAL), ["shot", "5", "ft_number"])


@pytest.mark.parametrize("opts, key", [
    (["arch", "PFENet"], "arch"),
    (["s2q_query_mask", "gt"], "s2q_query_mask"),
    (["data_set", "ade20k"], "data_set"),
    (["layers", "34"], "layers"),
])
def test_choices(tmp_path, opts, key):
    with pytest.raises(ValueError, match=rf"'{key}' must be one of"):
        load_config(write_cfg(tmp_path, MINIMAL), opts)


def test_valid_choices_accepted(tmp_path):
    cfg = load_config(write_cfg(tmp_path, MINIMAL),
                      ["arch", "BAM", "s2q_query_mask", "ground_truth", "data_set", "demo"])
    assert (cfg.arch, cfg.s2q_query_mask, cfg.data_set) == ("BAM", "ground_truth", "demo")


@pytest.mark.parametrize("opts, pattern", [
    (["shot", "0"], "shot must be >= 1"),
    (["val_size", "0"], "val_size"),
    (["ft_number", "0"], "ft_number"),
    (["change_weighting", "[0.8, 0.1, 0.1]"], "change_weighting"),
    (["change_weighting", "[0.8, x]"], "change_weighting"),
    (["q2s_filt_para", "0"], "q2s_filt_para"),
    (["q2s_filt_para", "1.5"], "q2s_filt_para"),
    (["device", "gpu"], "device"),
    (["split", "4"], "split"),
])
def test_value_validation(tmp_path, opts, pattern):
    with pytest.raises(ValueError, match=pattern):
        load_config(write_cfg(tmp_path, MINIMAL), opts)


def test_ft_number_zero_allowed_without_loop_ft(tmp_path):
    cfg = load_config(write_cfg(tmp_path, MINIMAL), ["loop_ft", "False", "ft_number", "0"])
    assert cfg.ft_number == 0


def test_five_shot_rule(tmp_path):
    path = write_cfg(tmp_path, MINIMAL)
    assert load_config(path).weight == "a.pth"
    assert load_config(path, ["shot", "5"]).weight == "b.pth"
    assert load_config(path, ["shot", "5", "weight", "x.pth"]).weight == "x.pth"
    assert load_config(path, ["weight", "x.pth", "shot", "5"]).weight == "x.pth"


def test_five_shot_rule_on_release_configs():
    cfg = load_config(CONFIG_DIR / "pascal/pascal_split2_vgg.yaml", ["shot", "5"])
    assert cfg.weight == "vgg_5_2_0.7248.pth"
    # no known 5-shot file: weight is left alone
    cfg = load_config(CONFIG_DIR / "pascal/pascal_split0_resnet50.yaml", ["shot", "5"])
    assert cfg.weight == "resnet50_0_0.6925.pth"


def test_empty_yaml_value_means_empty_string(tmp_path):
    cfg = load_config(write_cfg(tmp_path, "Test_Finetune:\n  show:\n"))
    assert cfg.show == ""


def test_reference_keys_not_read_are_reported_or_refused(tmp_path):
    path = write_cfg(tmp_path, "Train:\n  scale_min: 0.5\n  warmup: True\n  ignore_label: 255\n")
    cfg = load_config(path, ["resume", "x.pth"])
    assert cfg.ignored_keys == ["ignore_label", "resume", "scale_min", "warmup"]
    assert config_summary(cfg).splitlines()[-1] == \
        "ignored (reference keys this code does not read): ignore_label, resume, scale_min, warmup"
    assert not any(key in cfg for key in cfg.ignored_keys)
    with pytest.raises(ConfigError, match=r"key 'ann_type' is 'bbox', but this code always works as with "
                                          r"ann_type: 'mask'"):
        load_config(path, ["ann_type", "bbox"])
    with pytest.raises(ConfigError, match="key 'resized_val' is False"):
        load_config(path, ["resized_val", "False"])
    with pytest.raises(ConfigError, match="key 'classes' is 3"):
        load_config(path, ["classes", "3"])
    with pytest.raises(ConfigError, match="key 'ignore_label' is 0"):
        load_config(write_cfg(tmp_path, "Train:\n  ignore_label: 0\n"))


def test_missing_file_and_bad_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ValueError, match="section 'Train' must be a mapping"):
        load_config(write_cfg(tmp_path, "Train: 5\n"))


def test_backbone_name():
    cfg = CfgNode(backbone="", vgg=False, layers=101)
    assert backbone_name(cfg) == "resnet101"
    cfg.vgg = True
    assert backbone_name(cfg) == "vgg"
    cfg.backbone = "tiny"
    assert backbone_name(cfg) == "tiny"


def test_repo_path(tmp_path):
    assert repo_path("lists/pascal/val.txt") == REPO_ROOT / "lists/pascal/val.txt"
    assert repo_path(tmp_path) == tmp_path
    assert (REPO_ROOT / "util" / "config.py").is_file()
    with pytest.raises(ValueError):
        repo_path("")


def test_config_summary_sorted(tmp_path):
    cfg = load_config(write_cfg(tmp_path, MINIMAL))
    lines = config_summary(cfg).splitlines()
    assert len(lines) == len(SCHEMA)
    assert [line.split(":")[0] for line in lines] == sorted(SCHEMA)
    assert "shot: 1" in lines and "weight: 'a.pth'" in lines


def test_checkpoint_rule_picks_the_file_of_the_arch_and_shot(tmp_path):
    path = write_cfg(tmp_path, MINIMAL + "  weight_bam: c.pth\n  weight_bam_5shot: d.pth\n")
    picked = {(arch, shot): load_config(path, ["arch", arch, "shot", str(shot)]).weight
              for arch in ("MSANet", "BAM") for shot in (1, 5)}
    assert picked == {("MSANet", 1): "a.pth", ("MSANet", 5): "b.pth", ("BAM", 1): "c.pth", ("BAM", 5): "d.pth"}
    assert load_config(path, ["arch", "BAM", "weight", "mine.pth"]).weight == "mine.pth"
    # A config that names no BAM file keeps `weight` (a mismatch then says to set the file).
    assert load_config(write_cfg(tmp_path, MINIMAL), ["arch", "BAM"]).weight == "a.pth"
    for fold in range(4):
        demo = load_config(CONFIG_DIR / f"demo/demo_split{fold}_mobilenetv2.yaml", ["arch", "BAM", "shot", "5"])
        assert demo.weight == f"demo_split{fold}_bam_5shot.pth" and demo.base_weight == f"demo_split{fold}_base.pth"
