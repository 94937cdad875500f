"""Every class of bad input through the entry scripts: one message naming the key or file, a
non-zero exit (2 for config and usage), no traceback; inputs that change the numbers refuse or
warn in results.json; a failed start leaves the output folder byte for byte as it was.

The scripts run in-process (``main(argv)``, SystemExit caught) on a tiny generated demo with
a random-weight checkpoint, 2 episodes and 1 seed.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import meta_test
import train
from model import build_model
from dataset import demo as demo_data, get_mulway_base_data
from evaluation import report
from util.config import load_config
from dataset.episodes import load_episodes, save_episodes
from util.errors import DataError, describe
from evaluation.records import per_round_mean

from tests.tiny_demo import finished_tiny_run



@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny demo benchmark, its config, a random-weight checkpoint and one finished run."""
    return finished_tiny_run(tmp_path_factory.mktemp("errors"))


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def fails(main, argv: list[str], capsys, code: int, *names: str) -> str:
    """Run an entry script that must fail: its exit code, one 'error:' message (a line, or a
    short block such as a checkpoint's key listing) naming every one of ``names``, no
    traceback. Returns the message."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == code, err
    assert "Traceback" not in err
    assert err.count(": error: ") == 1, err
    start = err.index(": error: ")
    message = err[err.rfind("\n", 0, start) + 1:]  # from the start of the error's line
    assert len(message.splitlines()) <= 12, message
    for name in names:
        assert name in message, (name, message)
    return message


def meta(path: Path, out: Path, *opts: str, restart: bool = False) -> list[str]:
    return ["--config", str(path), "--exp-dir", str(out)] + (["--restart"] if restart else []) + \
        (["--opts", *opts] if opts else [])


def copy_run(done: Path, to: Path, records: bool = True) -> Path:
    shutil.copytree(done, to, ignore=None if records else shutil.ignore_patterns("records_*", "results.*"))
    return to


def copy_data(root: Path, to: Path) -> tuple[Path, list[str]]:
    """A copy of the demo benchmark (to damage) and the opts that point a run at it."""
    shutil.copytree(root / "demo", to)
    return to, ["data_root", str(to), "lists_root", str(to / "lists")]


# ---------------------------------------------------------------- config and usage (exit 2)

@pytest.mark.parametrize("opts, names", [
    (["ft_base_lr", "-0.01"], ["ft_base_lr", "-0.01"]),
    (["base_lr", "-1"], ["base_lr"]),
    (["workers", "-2"], ["workers", "-2"]),
    (["manual_seed", "-5"], ["manual_seed", "-5"]),
    (["split", "4"], ["split must be 0..3", "demo"]),
    (["data_set", "pascal", "split", "-1"], ["split must be 0..3", "pascal"]),
    (["val_size", "9"], ["val_size", "9"]),
    (["shto", "2"], ["shto", "'shot'"]),
    (["shot", "one"], ["shot", "'one'"]),
    (["shot"], ["--opts", "odd"]),
    (["weight_path", "", "weight", ""], ["no checkpoint configured", "weight"]),
])
def test_bad_config_values(setup, capsys, opts, names):
    root, path, _ = setup
    out = root / "never"
    fails(meta_test.main, meta(path, out, *opts), capsys, 2, *names)
    assert not out.exists()


def test_yaml_syntax_error_names_file_and_line(setup, tmp_path, capsys):
    _, path, _ = setup
    broken = tmp_path / "broken.yaml"
    lines = path.read_text().splitlines()
    lines[3] = lines[3] + ": x"  # 'key: value: x' on line 4
    broken.write_text("\n".join(lines) + "\n")
    fails(meta_test.main, ["--config", str(broken)], capsys, 2, str(broken), "line 4", "YAML")


def test_missing_config_and_unknown_section_key(setup, tmp_path, capsys):
    _, path, _ = setup
    fails(meta_test.main, ["--config", str(tmp_path / "nope.yaml")], capsys, 2, "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text(path.read_text().replace("ft_number:", "ft_numbr:"))
    fails(meta_test.main, ["--config", str(bad)], capsys, 2, "ft_numbr", "'ft_number'", str(bad))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_unavailable_device(setup, capsys):
    root, path, _ = setup
    fails(meta_test.main, meta(path, root / "never", "device", "cuda"), capsys, 2, "'cuda'", "device cpu")


def test_debug_shows_the_exception(setup):
    root, path, _ = setup
    with pytest.raises(ValueError, match="workers must be >= 0"):
        meta_test.main(["--debug"] + meta(path, root / "never", "workers", "-1"))


# ---------------------------------------------------------------- checkpoints (exit 1)

def test_missing_checkpoint_points_to_weights_readme(setup, capsys):
    root, path, _ = setup
    fails(meta_test.main, meta(path, root / "never", "weight_path", str(root / "nothing.pth")), capsys, 1,
          "nothing.pth", "weights/README.md")


def test_unreadable_and_mismatched_checkpoints(setup, tmp_path, capsys):
    root, path, _ = setup
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    fails(meta_test.main, meta(path, tmp_path / "o1", "weight_path", str(junk)), capsys, 1, "cannot read", "junk.pth")
    message = fails(meta_test.main, meta(path, tmp_path / "o2", "shot", "2"), capsys, 1, "weights.pth", "kshot_rw")
    assert "\n  hint: the file is a 1-shot checkpoint" in message  # the block of the same message
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_non_finite_checkpoint_refuses(setup, tmp_path, capsys):
    root, path, _ = setup
    state = torch.load(root / "weights.pth", weights_only=True)
    state["state_dict"]["cls_meta.3.weight"][0, 0] = float("nan")
    bad = tmp_path / "nan.pth"
    torch.save(state, bad)
    fails(meta_test.main, meta(path, tmp_path / "out", "weight_path", str(bad)), capsys, 1,
          "nan.pth", "non-finite", "cls_meta.3.weight")
    assert not (tmp_path / "out").exists()


def test_records_of_another_checkpoint_file_are_not_mixed(setup, tmp_path, capsys):
    root, path, _ = setup
    weights = tmp_path / "w.pth"
    shutil.copy(root / "weights.pth", weights)
    out = tmp_path / "out"
    meta_test.main(meta(path, out, "weight_path", str(weights), "loop_ft", "False"))
    before = snapshot(out)
    torch.manual_seed(1)  # another model, saved at the same path
    torch.save({"epoch": 2, "state_dict": build_model(load_config(path)).state_dict()}, weights)
    fails(meta_test.main, meta(path, out, "weight_path", str(weights), "loop_ft", "False"), capsys, 1,
          str(out), "another checkpoint file", "--restart")
    assert snapshot(out) == before


# ---------------------------------------------------------------- data (exit 1)

def test_missing_data_root_and_lists_root(setup, tmp_path, capsys):
    root, path, _ = setup
    # (a missing demo data_root is where the demo is generated on first use, hence pascal)
    fails(meta_test.main, meta(path, tmp_path / "o", "data_set", "pascal", "data_root", str(tmp_path / "nowhere")),
          capsys, 1, "data_root", "nowhere")
    fails(meta_test.main, meta(path, tmp_path / "o", "lists_root", str(tmp_path / "nolists")), capsys, 1,
          "lists_root", "nolists")
    assert not (tmp_path / "o").exists()


def first_query(done: Path) -> tuple[str, str]:
    episodes, _ = load_episodes(str(done / "episodes_seed510.json"))
    return episodes[0].query


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
@pytest.mark.parametrize("workers", ["0", "1"])
def test_bad_image_is_named_same_message_in_workers(setup, tmp_path, capsys, damage, workers):
    root, path, done = setup
    data, opts = copy_data(root, tmp_path / "data")
    image = data / first_query(done)[0]
    content = image.read_bytes()
    image.write_bytes(content[:len(content) // 2] if damage == "truncated" else b"GIF89a not really")
    message = fails(meta_test.main, meta(path, tmp_path / "out", *opts, "workers", workers), capsys, 1,
                    str(image), damage if damage == "truncated" else "cannot decode")
    assert "DataLoader worker" not in message and "Caught" not in message


def test_label_with_values_outside_the_classes(setup, tmp_path, capsys):
    root, path, done = setup
    import cv2
    data, opts = copy_data(root, tmp_path / "data")
    label_path = data / first_query(done)[1]
    label = cv2.imread(str(label_path), cv2.IMREAD_UNCHANGED)
    label[0, 0] = 99
    cv2.imwrite(str(label_path), label)
    fails(meta_test.main, meta(path, tmp_path / "out", *opts, "workers", "1"), capsys, 1, str(label_path), "[99]")


# ---------------------------------------------------------------- episode files (exit 1)

def test_missing_and_malformed_episode_files(setup, tmp_path, capsys):
    root, path, done = setup
    fails(meta_test.main, meta(path, tmp_path / "o", "episode_file", str(tmp_path / "ep_{seed}.json")), capsys, 1,
          "ep_510.json", "does not exist")
    (tmp_path / "ep_510.json").write_text('{"format": "eftnet-episodes/1", "episodes": [')
    fails(meta_test.main, meta(path, tmp_path / "o", "episode_file", str(tmp_path / "ep_{seed}.json")), capsys, 1,
          "ep_510.json", "not valid JSON")
    fails(meta_test.main, meta(path, tmp_path / "o", "test_num", "3", "episode_file",
                               str(done / "episodes_seed510.json")), capsys, 1,
          "episodes_seed510.json", "holds 2 episodes", "test_num")
    assert not (tmp_path / "o").exists()


def test_episode_whose_support_is_the_query_or_lacks_the_class(setup, tmp_path, capsys):
    root, path, done = setup
    episodes, meta_info = load_episodes(str(done / "episodes_seed510.json"))
    selfie = tmp_path / "selfie.json"
    episodes[1].supports = [episodes[1].query]
    save_episodes(str(selfie), episodes, meta_info)
    fails(meta_test.main, meta(path, tmp_path / "o", "episode_file", str(selfie)), capsys, 1,
          "selfie.json", "episode 1", "query image", episodes[1].query[0])
    episodes, _ = load_episodes(str(done / "episodes_seed510.json"))
    import cv2
    label = cv2.imread(str(root / "demo" / episodes[0].query[1]), cv2.IMREAD_UNCHANGED)
    absent = next(c for c in range(1, 6) if c not in np.unique(label))  # a novel class of fold 0
    episodes[0].class_id = absent
    wrong = tmp_path / "wrong.json"
    save_episodes(str(wrong), episodes, meta_info)
    fails(meta_test.main, meta(path, tmp_path / "o", "episode_file", str(wrong)), capsys, 1,
          "wrong.json", "episode 0", f"class {absent}", "absent", episodes[0].query[1])


def test_episode_list_left_in_the_folder_must_agree(setup, tmp_path, capsys):
    root, path, done = setup
    out = copy_run(done, tmp_path / "out", records=False)
    before = snapshot(out)
    fails(meta_test.main, meta(path, out, "test_num", "3"), capsys, 1,
          "episodes_seed510.json", "2 episodes there, test_num 3")
    episodes, meta_info = load_episodes(str(out / "episodes_seed510.json"))
    other = tmp_path / "other.json"
    save_episodes(str(other), episodes[::-1], meta_info)
    fails(meta_test.main, meta(path, out, "episode_file", str(other)), capsys, 1,
          "episodes_seed510.json", "other episodes than episode_file", "other.json")
    assert snapshot(out) == before
    # --restart replaces the list: the heading and the list agree with the config
    results = meta_test.main(meta(path, out, "test_num", "3", "loop_ft", "False", restart=True))
    assert len(load_episodes(str(out / "episodes_seed510.json"))[0]) == 3
    assert results["seeds"][510]["episodes"] == 3
    assert ", 3 episodes x 1 seeds" in (out / "results.txt").read_text()


# ---------------------------------------------------------------- output folder and records

def test_output_folder_that_is_a_file(setup, tmp_path, capsys):
    _, path, _ = setup
    (tmp_path / "out").write_text("mine")
    fails(meta_test.main, meta(path, tmp_path / "out"), capsys, 1, str(tmp_path / "out"), "is a file")
    assert (tmp_path / "out").read_text() == "mine"


def test_changed_config_keeps_the_records(setup, tmp_path, capsys):
    _, path, done = setup
    out = copy_run(done, tmp_path / "out")
    before = snapshot(out)
    fails(meta_test.main, meta(path, out, "q2s_filt_para", "0.3"), capsys, 1,
          str(out), "q2s_filt_para 0.2 -> 0.3", "--restart")
    assert snapshot(out) == before


@pytest.mark.parametrize("bad", ["checkpoint", "data", "episodes", "config"])
def test_failed_restart_leaves_records_and_results(setup, tmp_path, capsys, bad):
    root, path, done = setup
    out = copy_run(done, tmp_path / "out")
    before = snapshot(out)
    assert any(name.startswith("records_") for name in before) and "results.json" in before
    nan = tmp_path / "nan.pth"
    state = torch.load(root / "weights.pth", weights_only=True)
    state["state_dict"]["cls_meta.3.bias"].fill_(float("inf"))
    torch.save(state, nan)
    opts, code = {"checkpoint": (["weight_path", str(nan)], 1),
                  "data": (["lists_root", str(tmp_path / "gone")], 1),
                  "episodes": (["episode_file", str(tmp_path / "gone.json")], 1),
                  "config": (["ft_base_lr", "-1"], 2)}[bad]
    fails(meta_test.main, meta(path, out, *opts, restart=True), capsys, code)
    assert snapshot(out) == before


def test_ragged_round_lists_still_give_results(setup, tmp_path):
    """Episodes that stopped early have fewer rounds; the summary must not crash on them."""
    _, path, done = setup
    out = copy_run(done, tmp_path / "out")
    records_path = out / "records_seed510_rank0.jsonl"
    records = [json.loads(line) for line in records_path.read_text().splitlines()]
    first = records[0]["rounds"]
    first["scores"], first["losses"], first["stopped_early"], first["chosen"] = \
        first["scores"][:1], first["losses"][:1], True, 1
    first["counts"] = first["counts"][:1]
    if "gt_scores" in first:
        first["gt_scores"] = first["gt_scores"][:1]
    records_path.write_text("".join(json.dumps(r) + "\n" for r in records))
    (out / "results.json").unlink()
    results = meta_test.main(meta(path, out))
    second = records[1]["rounds"]["scores"]
    expected = [np.mean([first["scores"][0], second[0]]), second[1]]
    assert results["seeds"][510]["mean_round_scores"] == pytest.approx(expected)
    assert results["seeds"][510]["stopped_early"] >= 1
    assert json.loads((out / "results.json").read_text())["seeds"]["510"]["episodes"] == 2
    assert not list(out.glob("*.tmp*"))  # results written through a temporary file, renamed
    assert per_round_mean([[1.0, 2.0, 3.0], [3.0], []]) == [2.0, 2.0, 3.0]


# ---------------------------------------------------------------- warnings that land in results.json

def test_val_size_outside_the_reference_geometry_warns_in_results(setup, tmp_path, capsys):
    _, path, _ = setup
    out = tmp_path / "out"
    results = meta_test.main(meta(path, out, "val_size", "96", "loop_ft", "False"))
    assert len(results["warnings"]) == 1 and "val_size 96 is not 8k+1" in results["warnings"][0]
    assert json.loads((out / "results.json").read_text())["warnings"] == results["warnings"]
    assert "WARNING: val_size 96 is not 8k+1" in capsys.readouterr().out
    assert "WARNING: val_size 96" in (out / "results.txt").read_text()
    table = report.main([str(out / "results.json")])
    assert "WARNING (fold 0): val_size 96 is not 8k+1" in table


# ---------------------------------------------------------------- train.py

def train_config(root: Path, tmp_path: Path, **train_keys) -> Path:
    config = {"Data": {"data_set": "demo", "split": 0, "data_root": str(root / "demo"),
                       "lists_root": str(root / "demo" / "lists")},
              "Method": {"backbone": "mobilenetv2", "reduce_dim": 16, "base_width": 16},
              "Train": {"train_h": 97, "train_w": 97, "val_size": 97, "init_backbone": "none", "workers": 0,
                        **train_keys},
              "Test_Finetune": {"weights_root": str(tmp_path / "weights"), "weight": "w.pth",
                                "exp_root": str(tmp_path / "exp")}}
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_train_never_replaces_a_checkpoint_without_overwrite(setup, tmp_path, capsys):
    root, _, _ = setup
    path = train_config(root, tmp_path)
    target = tmp_path / "weights" / "demo" / "split0" / "mobilenetv2" / "w.pth"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"a committed model")
    fails(train.main, ["--config", str(path)], capsys, 2, str(target), "--overwrite")
    assert target.read_bytes() == b"a committed model"
    assert not (tmp_path / "exp").exists()


def test_train_bad_keys_and_data(setup, tmp_path, capsys):
    root, _, _ = setup
    fails(train.main, ["--config", str(train_config(root, tmp_path, train_h=96, train_w=96))], capsys, 2,
          "train_h", "8k+1")
    fails(train.main, ["--config", str(train_config(root, tmp_path, base_learner_lr=-0.1))], capsys, 2,
          "base_learner_lr")
    fails(train.main, ["--config", str(train_config(root, tmp_path)), "--opts", "lists_root", str(tmp_path / "x")],
          capsys, 1, "list file not found", str(tmp_path / "x"))


# ---------------------------------------------------------------- the other entry points

def test_report_bad_results_files(tmp_path, capsys):
    fails(report.main, [str(tmp_path / "none.json")], capsys, 1, "none.json", "meta_test.py")
    (tmp_path / "torn.json").write_text('{"split": 0, "zero": {')
    fails(report.main, [str(tmp_path / "torn.json")], capsys, 1, "torn.json", "not valid JSON")
    (tmp_path / "other.json").write_text('{"a": 1}')
    fails(report.main, [str(tmp_path / "other.json")], capsys, 1, "other.json", "not a results.json")


def test_demo_data_bad_arguments(tmp_path, capsys):
    fails(demo_data.main, ["--root", str(tmp_path / "d"), "--size", "10"], capsys, 2, "size must be >= 64")
    (tmp_path / "file").write_text("x")
    fails(demo_data.main, ["--root", str(tmp_path / "file" / "d"), "--num-train", "1", "--num-val", "1"],
          capsys, 1, str(tmp_path / "file"))


def test_base_annotation_tool_bad_inputs(tmp_path, capsys):
    argv = ["--data-set", "demo", "--data-root", str(tmp_path), "--split", "0", "--out", str(tmp_path / "o")]
    fails(get_mulway_base_data.main, argv + ["--list", str(tmp_path / "none.txt")], capsys, 1, "none.txt")
    (tmp_path / "list.txt").write_text("a.jpg b.png extra\n")
    fails(get_mulway_base_data.main, argv + ["--list", str(tmp_path / "list.txt")], capsys, 1, "list.txt", "line 1")


def test_worker_messages_are_unwrapped():
    """torch re-raises a worker's exception with the worker's traceback in its message."""
    from torch.utils.data import DataLoader, Dataset

    class Broken(Dataset):
        def __len__(self) -> int:
            return 1

        def __getitem__(self, i: int):
            raise DataError("image x.jpg is truncated\n  hint: replace it")

    with pytest.raises(DataError) as info:
        list(DataLoader(Broken(), batch_size=None, num_workers=1))
    assert describe(info.value) == "image x.jpg is truncated\n  hint: replace it"
