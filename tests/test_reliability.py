"""Trust under concurrency, interruption and mismatched inputs: two real processes on one output
folder, real signals (SIGKILL, SIGINT, SIGTERM) in the middle of a run, damaged records, runs of
different settings in one summary, files of another fold, values that would change the numbers.

Runs that must be killed or raced go through ``python meta_test.py`` in subprocesses; the rest
run in-process as in test_errors.py.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import meta_test
import train
from dataset.episodes import load_episodes, save_episodes
from evaluation import report
from model import build_model
from util.checkpoint import CheckpointMismatch, load_weights
from util.config import load_config
from util.lock import LOCK_NAME

from tests.test_errors import copy_run, fails, meta, snapshot, train_config
from tests.tiny_demo import finished_tiny_run

REPO = Path(__file__).resolve().parents[1]
SLOW = ["test_num", "150"]  # about 20 s: long enough to be caught in the middle


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny demo benchmark, its config, a random-weight checkpoint and one finished run."""
    return finished_tiny_run(tmp_path_factory.mktemp("reliability"))


def start(path: Path, out: Path, *opts: str, restart: bool = False) -> subprocess.Popen:
    """meta_test.py in a process of its own."""
    argv = [sys.executable, "meta_test.py", *meta(path, out, *opts, restart=restart)]
    return subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def wait_for(condition, process: subprocess.Popen, what: str, timeout: float = 240) -> None:
    """Poll ``condition`` until it holds, failing if ``process`` ends or time runs out first."""
    end = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the run ended before {what}: {process.communicate()[1][-2000:]}")
        if time.monotonic() > end:
            process.kill()
            raise AssertionError(f"no {what} within {timeout} s")
        time.sleep(0.05)


def records_of(out: Path) -> list[dict]:
    path = out / "records_seed510_rank0.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def has_records(out: Path, count: int = 1):
    path = out / "records_seed510_rank0.jsonl"
    return lambda: path.exists() and path.read_bytes().count(b"\n") >= count


def held_by(out: Path, process: subprocess.Popen):
    """True once ``process`` holds ``out`` (its lock file names it)."""
    def holds() -> bool:
        try:
            return json.loads((out / LOCK_NAME).read_text())["pid"] == process.pid
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            return False
    return holds


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    stdout, stderr = process.communicate(timeout=timeout)
    return process.returncode, stdout, stderr


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "meta_test.py: " in line]


# ---------------------------------------------------------------- 1. two runs on one folder

def test_a_second_run_on_a_held_folder_refuses_and_the_first_finishes_alone(setup, tmp_path):
    _, path, _ = setup
    out = tmp_path / "out"
    first = start(path, out, *SLOW)
    wait_for(held_by(out, first), first, "the lock")
    for opts in (SLOW + ["q2s_filt_para", "0.3"], SLOW):  # another variant, then the very same command
        code, _, stderr = finish(start(path, out, *opts))
        assert code == 1, stderr
        assert "Traceback" not in stderr
        [line] = error_lines(stderr)
        assert f"{out} is in use by another run: pid {first.pid} on host" in line and "--exp-dir" in line
        assert first.poll() is None  # refused while the first run was writing
    code, _, stderr = finish(first)
    assert code == 0, stderr[-2000:]
    assert [r["episode"] for r in records_of(out)] == list(range(150))  # one record per episode, no stranger
    assert not (out / LOCK_NAME).exists()
    assert json.loads((out / "results.json").read_text())["settings"]["q2s_filt_para"] == 0.2


def test_the_lock_of_a_killed_run_is_taken_over_with_a_message(setup, tmp_path):
    _, path, _ = setup
    out = tmp_path / "out"
    killed = start(path, out, *SLOW)
    wait_for(has_records(out, 2), killed, "two records")
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == killed.pid  # left behind by the dead process
    kept = len(records_of(out))
    code, _, stderr = finish(start(path, out, *SLOW))
    assert code == 0, stderr[-2000:]
    assert f"took over the lock of pid {killed.pid} on host" in stderr and "no longer running" in stderr
    episodes = [r["episode"] for r in records_of(out)]
    assert sorted(episodes) == list(range(150)) and episodes[:kept] == list(range(kept))
    assert not (out / LOCK_NAME).exists()


# ---------------------------------------------------------------- 2. a killed --restart

def test_a_killed_restart_leaves_nothing_that_described_the_old_records(setup, tmp_path):
    _, path, done = setup
    out = copy_run(done, tmp_path / "out")
    old = {"results.json", "results.txt", "episode_counts.json", "plot_round_miou.png"}
    assert old <= {p.name for p in out.iterdir()}
    old_curves = {p.name for p in (out / "tensorboard").iterdir()}
    assert old_curves
    restarted = start(path, out, *SLOW, restart=True)
    new_config = lambda: '"test_num": 150' in (out / "config.json").read_text()  # noqa: E731
    wait_for(lambda: new_config() and has_records(out, 1)(), restarted, "a record of the new run")
    restarted.send_signal(signal.SIGKILL)
    restarted.wait()
    left = {p.name for p in out.iterdir()}
    assert not old & left and not any(name.startswith("plot_") for name in left), left
    assert not old_curves & {p.name for p in (out / "tensorboard").iterdir()}  # only the new run's curves
    assert all(r["episode"] < 150 for r in records_of(out))


# ---------------------------------------------------------------- 7. interruption

@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_is_one_line_and_the_run_resumes(setup, tmp_path, signum, code):
    _, path, _ = setup
    out = tmp_path / "out"
    run = start(path, out, *SLOW)
    wait_for(has_records(out, 2), run, "two records")
    run.send_signal(signum)
    returncode, _, stderr = finish(run)
    assert returncode == code, stderr[-2000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    [line] = error_lines(stderr)
    name = signal.Signals(signum).name
    assert line == (f"meta_test.py: interrupted by {name}: the records of finished episodes are kept in {out}; "
                    "rerun the same command to resume")
    assert not (out / LOCK_NAME).exists()
    kept = len(records_of(out))
    assert kept >= 2
    results = meta_test.main(meta(path, out, *SLOW))
    assert results["seeds"][510]["episodes"] == 150
    assert sorted(r["episode"] for r in records_of(out)) == list(range(150))


# ---------------------------------------------------------------- 8. damaged records

@pytest.mark.parametrize("damage, named", [
    (lambda lines: [lines[0], b"\xff\xfe not text", lines[1]], "bytes that are not UTF-8 text"),
    (lambda lines: [lines[0], b'{"seconds": 1.5}', lines[1]], "no 'episode', 'class_idx', 'zero', 'base' field"),
    (lambda lines: [lines[0], lines[1], lines[0]], "episode 0 is recorded a second time"),
    (lambda lines: [lines[0], b'{"episode": 7, "class_idx": 0, "zero": {}, "base": []}'], "episode 7 is not an"),
])
def test_damaged_records_refuse_naming_file_and_line(setup, tmp_path, capsys, damage, named):
    _, path, done = setup
    out = copy_run(done, tmp_path / "out")
    records = out / "records_seed510_rank0.jsonl"
    records.write_bytes(b"\n".join(damage(records.read_bytes().splitlines())) + b"\n")
    before = snapshot(out)
    message = fails(meta_test.main, meta(path, out), capsys, 1, f"{records}, line ", named, "--restart")
    assert message.count("\n") == 1
    assert snapshot(out) == before
    assert meta_test.main(meta(path, out, restart=True))["seeds"][510]["episodes"] == 2  # --restart mends it


def test_a_torn_last_line_is_reported_and_rerun(setup, tmp_path, caplog):
    _, path, done = setup
    out = copy_run(done, tmp_path / "out")
    records = out / "records_seed510_rank0.jsonl"
    lines = records.read_bytes().splitlines()
    records.write_bytes(lines[0] + b"\n" + lines[1][:30])
    (out / "results.json").unlink()
    results = meta_test.main(meta(path, out))
    assert f"{records}, line 2: the last record was cut short by a kill; it is removed and its episode runs " \
           "again" in caplog.text
    assert results["seeds"][510]["episodes"] == 2
    assert [r["episode"] for r in records_of(out)] == [0, 1]


# ---------------------------------------------------------------- 3. train.py --then targets

def test_then_clause_writing_the_first_checkpoint_refuses_before_training(setup, tmp_path, capsys):
    root, _, _ = setup
    path = train_config(root, tmp_path, base_weight="base.pth")
    fails(train.main, ["--config", str(path), "--then", "epochs", "2"], capsys, 2,
          "--then epochs 2", "w.pth", "the config's checkpoint", "weight NAME")
    fails(train.main, ["--config", str(path), "--overwrite", "--then", "shot", "5"], capsys, 2, "--then shot 5",
          "w.pth")  # no weight_5shot in the config: the 5-shot run would write the 1-shot file
    assert not (tmp_path / "weights").exists() and not (tmp_path / "exp").exists()


def test_then_errors_name_the_then_clause(setup, tmp_path, capsys):
    root, _, _ = setup
    path = train_config(root, tmp_path, base_weight="base.pth")
    fails(train.main, ["--config", str(path), "--then", "shto", "5"], capsys, 2, "unknown config key 'shto' in "
          "--then shto 5")
    fails(train.main, ["--config", str(path), "--then", "ft_number", "-1", "--opts", "weight", "x.pth"], capsys, 2,
          "with --then ft_number -1")


# ---------------------------------------------------------------- 4. the report's folds

@pytest.fixture(scope="module")
def fold_results(setup, tmp_path_factory):
    """results.json of fold 0 (the finished run) and a fold-1 twin of it."""
    _, _, done = setup
    folder = tmp_path_factory.mktemp("folds")
    fold0 = json.loads((done / "results.json").read_text())
    fold1 = {**fold0, "split": 1, "settings": {**fold0["settings"], "split": 1, "weight_path": "other.pth"}}
    return folder, fold0, fold1


def write_results(folder: Path, name: str, results: dict) -> Path:
    (folder / name).mkdir(exist_ok=True)
    path = folder / name / "results.json"
    path.write_text(json.dumps(results))
    return path


@pytest.mark.parametrize("change, named", [
    (lambda r: {**r, "split": 0, "settings": {**r["settings"], "split": 0}}, "both fold 0"),
    (lambda r: {**r, "shot": 5, "settings": {**r["settings"], "shot": 5}}, "shot 1 vs 5"),
    (lambda r: {**r, "arch": "BAM", "settings": {**r["settings"], "arch": "BAM"}}, "arch 'MSANet' vs 'BAM'"),
    (lambda r: {**r, "settings": {**r["settings"], "change_weighting": [0.6, 0.4]}},
     "change_weighting [0.8, 0.2] vs [0.6, 0.4]"),
    (lambda r: {**r, "settings": {**r["settings"], "test_num": 500}}, "test_num 2 vs 500"),
])
def test_report_refuses_runs_of_different_settings(fold_results, capsys, change, named):
    folder, fold0, fold1 = fold_results
    first, second = write_results(folder, "a", fold0), write_results(folder, "b", change(fold1))
    fails(report.main, [str(first), str(second)], capsys, 1, str(first), str(second), named)


def test_report_takes_the_folds_of_one_setting(fold_results):
    folder, fold0, fold1 = fold_results
    table = report.main([str(write_results(folder, "a", fold0)), str(write_results(folder, "c", fold1))])
    assert table.splitlines()[2].split()[0] == "0" and table.splitlines()[3].split()[0] == "1"


# ---------------------------------------------------------------- 5. values that change the numbers

@pytest.mark.parametrize("opts, names", [
    (["change_weighting", "[.nan, 0.2]"], ["change_weighting", "nan", "finite"]),
    (["ft_base_lr", ".inf"], ["ft_base_lr", "inf", "finite"]),
    (["q2s_filt_para", "-.inf"], ["q2s_filt_para", "finite"]),
    (["episode_file", "my_episodes.json", "num_seeds", "3"], ["episode_file", "{seed}", "num_seeds is 3"]),
    (["test_num", "1000000000"], ["test_num must be <= 100000", "1000000000"]),
    (["round_selection", "stop_vote", "s2q_query_mask", "ground_truth"], ["round_selection 'stop_vote'", "pseudo"]),
    (["arch", "HSNet", "hsnet_widths", "[5,8,8]"], ["hsnet_widths must be three multiples of 4", "[5, 8, 8]"]),
])
def test_values_that_change_the_numbers_refuse(setup, tmp_path, capsys, opts, names):
    _, path, _ = setup
    fails(meta_test.main, meta(path, tmp_path / "never", *opts), capsys, 2, *names)
    assert not (tmp_path / "never").exists()


def test_a_support_without_the_class_in_an_episode_file_refuses(setup, tmp_path, capsys):
    root, path, done = setup
    import cv2
    import numpy as np
    episodes, info = load_episodes(str(done / "episodes_seed510.json"))
    episode = episodes[1]
    candidates = [line.split() for line in (root / "demo" / "lists" / "demo" / "val.txt").read_text().splitlines()]
    lacking = next((image, label) for image, label in candidates if episode.class_id not in np.unique(
        cv2.imread(str(root / "demo" / label), cv2.IMREAD_UNCHANGED)))
    episode.supports = [tuple(lacking)]
    bad = tmp_path / "bad.json"
    save_episodes(str(bad), episodes, info)
    fails(meta_test.main, meta(path, tmp_path / "o", "episode_file", str(bad)), capsys, 1,
          "bad.json", "episode 1", f"class {episode.class_id}", "support 0 label", episode.supports[0][1])


def test_another_folds_checkpoint_refuses(setup, tmp_path, capsys):
    root, path, _ = setup
    state = torch.load(root / "weights.pth", weights_only=True)
    about = {"data_set": "demo", "split": 1, "novel_classes": [6, 7, 8, 9, 10], "backbone": "mobilenetv2",
             "arch": "MSANet", "shot": 1}
    torch.save({**state, "trained_for": about}, tmp_path / "fold1.pth")
    fails(meta_test.main, meta(path, tmp_path / "o", "weight_path", str(tmp_path / "fold1.pth")), capsys, 1,
          "fold1.pth", "split 1 (the config: 0)", "novel_classes [6, 7, 8, 9, 10] (the config: [1, 2, 3, 4, 5])")
    torch.save({**state, "trained_for": {**about, "split": 0, "novel_classes": [1, 2, 3, 4, 5]}}, tmp_path / "f0.pth")
    assert meta_test.main(meta(path, tmp_path / "ok", "weight_path", str(tmp_path / "f0.pth"), "loop_ft", "False"))


def test_released_file_names_carry_their_fold_and_shot(setup, tmp_path):
    _, path, _ = setup
    model = build_model(load_config(path))
    expected = {"data_set": "pascal", "split": 0, "novel_classes": [1, 2, 3, 4, 5], "backbone": "resnet50",
                "arch": "MSANet", "shot": 1}
    for name, says in (("resnet50_1_0.7460.pth", "split 1 (the config: 0)"),
                       ("resnet50_5_0_0.7069.pth", "shot 5 (the config: 1)"),
                       ("vgg_0_0.6487.pth", "backbone 'vgg' (the config: 'resnet50')")):
        torch.save({"state_dict": model.state_dict()}, tmp_path / name)
        with pytest.raises(CheckpointMismatch, match="its released file name says .*" + re.escape(says)):
            load_weights(model, tmp_path / name, expected=expected)


def test_committed_demo_files_say_what_they_were_trained_for():
    for split in range(4):
        folder = REPO / "weights" / "demo" / f"split{split}" / "mobilenetv2"
        for file in sorted(folder.glob("*.pth")):
            about = torch.load(file, weights_only=True)["trained_for"]
            if file.stem == "hsnet_backbone":  # HSNet's frozen ImageNet backbone: one file for every fold
                assert about == {"backbone": "mobilenetv2"}, file
                continue
            assert about["split"] == split and about["data_set"] == "demo", file
            assert about["novel_classes"] == list(range(5 * split + 1, 5 * split + 6)), file
            assert ("arch" in about) == ("base" not in file.stem), file
            if "arch" in about:
                arch = "HSNet" if "hsnet" in file.stem else "BAM" if "bam" in file.stem else "MSANet"
                assert about["arch"] == arch, file
                # HSNet's K shots vote with its 1-shot model: its file is for no number of shots
                assert about.get("shot") == (None if arch == "HSNet" else 5 if "5shot" in file.stem else 1), file


def test_episodes_that_stopped_early_are_counted_in_the_warnings(setup, tmp_path):
    _, path, _ = setup
    out = tmp_path / "out"
    # so large a learning rate that a non-finite loss stops the rounds
    results = meta_test.main(meta(path, out, "ft_base_lr", "1e30", "ft_number", "4"))
    stopped = results["seeds"][510]["stopped_early"]
    assert stopped >= 1
    line = f"{stopped} of 2 episodes stopped their EFTNet rounds early (a non-finite fine-tuning loss"
    assert any(w.startswith(line) for w in results["warnings"])
    assert f"WARNING: {line}" in (out / "results.txt").read_text()
    assert f"WARNING (fold 0): {line}" in report.main([str(out / "results.json")])


# ---------------------------------------------------------------- 9. smaller ones

def test_a_key_given_twice_in_one_section_refuses(setup, tmp_path, capsys):
    _, path, _ = setup
    config = yaml.safe_load(path.read_text())
    text = yaml.safe_dump(config).replace("  ft_number: 2\n", "  ft_number: 2\n  ft_number: 7\n")
    twice = tmp_path / "twice.yaml"
    twice.write_text(text)
    line = text.splitlines().index("  ft_number: 7") + 1
    fails(meta_test.main, ["--config", str(twice)], capsys, 2, str(twice), f"line {line}", "'ft_number'",
          "given twice", f"also on line {line - 1}")


def test_miniature_sh_refuses_arguments():
    done = subprocess.run(["bash", "miniature.sh", "pascal"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "miniature.sh: takes no arguments (got: pascal)" in done.stderr and done.stdout == ""


def test_meta_test_sh_errors_go_to_stderr_and_the_log(tmp_path):
    env = {**os.environ, "OPTS": "ft_number -3", "EXP": str(tmp_path / "exp"), "TAG": "bad"}
    done = subprocess.run(["bash", "meta_test.sh", "demo", "mobilenetv2", "1", "0"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "meta_test.py: error: " in done.stderr and "ft_number" in done.stderr
    assert "meta_test.py: error" not in done.stdout
    log = tmp_path / "exp" / "demo" / "MSANet_mobilenetv2_1shot" / "bad" / "split0" / "meta_test.log"
    assert "meta_test.py: error: " in log.read_text()


def test_meta_only_checkpoint_without_base_weight_says_set_base_weight(capsys, tmp_path):
    config = REPO / "config" / "demo" / "demo_split0_mobilenetv2.yaml"
    fails(meta_test.main, ["--config", str(config), "--exp-dir", str(tmp_path / "o"), "--opts", "base_weight", "''"],
          capsys, 1, "demo_split0.pth", "missing", "hint: the file holds no backbone or base-learner keys",
          "set `base_weight`")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("folder", ["/sys/kernel", "/sys/eftnet_output"])
def test_an_unwritable_output_folder_is_named_with_a_hint(setup, capsys, folder):
    """sysfs accepts no new files or folders, even from root."""
    _, path, _ = setup
    if not Path("/sys/kernel").is_dir():
        pytest.skip("no sysfs here")
    message = fails(meta_test.main, meta(path, Path(folder)), capsys, 1,
                    f"cannot write in the output folder {folder}", "--exp-dir")
    assert ".tmp" not in message and LOCK_NAME not in message
