"""meta_test.py end to end on a tiny generated demo benchmark with a random-weight checkpoint."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import meta_test
from tests.tiny_demo import tiny_demo

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny demo benchmark, a config for it and a random-weight checkpoint."""
    root = tmp_path_factory.mktemp("meta_test")
    path = tiny_demo(root, {"reduce_dim": 32, "base_width": 32},
                     {"test_num": 5, "num_seeds": 2, "workers": 0, "sr_aux_weight1": 1.0, "tb_images": 2,
                      "ft_number": 3, "s2q_gt_scores": True}, foreground_bias=1.0)
    return root, path


def run(path: Path, out: Path, *opts: str, restart: bool = False) -> dict:
    argv = ["--config", str(path), "--exp-dir", str(out)] + (["--restart"] if restart else [])
    return meta_test.main(argv + (["--opts", *opts] if opts else []))


def seed_numbers(results: dict) -> list[float]:
    return [v for s in results["seeds"].values() for m in ("zero", "eftnet") if m in s
            for v in (s[m]["miou"], s[m]["fbiou"])]


@pytest.fixture(scope="module")
def full_run(setup):
    root, path = setup
    return run(path, root / "full"), root / "full"


def test_results_and_files(full_run):
    results, out = full_run
    assert list(results["seeds"]) == [510, 365]
    assert results["s2q_query_mask"] == "pseudo" and results["uses_query_labels"] is False
    for seed, summary in results["seeds"].items():
        assert summary["episodes"] == 5
        assert 0 <= summary["zero"]["miou"] <= 1 and 0 <= summary["eftnet"]["fbiou"] <= 1
        assert sum(summary["chosen_rounds"]) == 5 and len(summary["mean_round_scores"]) == 3
        records = [json.loads(line) for line in (out / f"records_seed{seed}_rank0.jsonl").read_text().splitlines()]
        assert sorted(r["episode"] for r in records) == list(range(5))
        assert all(1 <= r["rounds"]["chosen"] <= 3 for r in records)
        episodes = json.loads((out / f"episodes_seed{seed}.json").read_text())["episodes"]
        assert len(episodes) == 5 and all(len(e["supports"]) == 1 for e in episodes)
    written = json.loads((out / "results.json").read_text())
    assert written["eftnet"]["miou_mean"] == pytest.approx(results["eftnet"]["miou_mean"])
    assert "mIoU base" in (out / "results.txt").read_text()


def test_tensorboard_holds_the_results(full_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    results, out = full_run
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    for tag in ("running/miou_zero", "running/miou_eftnet", "time/seconds_per_episode", "rounds/chosen_round",
                "seed/miou_zero", "seed/miou_eftnet", "seed/fbiou_zero", "seed/fbiou_eftnet", "seed/base_miou",
                "rounds/s2q_score_seed510", "rounds/loss_seed510"):
        assert tag in tags["scalars"], tag
    assert "rounds/chosen_round_histogram" in tags["histograms"]
    assert sorted(tags["images"]) == ["episodes/0000", "episodes/0001", "plots/chosen_rounds", "plots/gains",
                                      "plots/round_miou", "plots/round_s2q_scores", "plots/s2q_score_vs_iou"]
    pooled = results["rules"]["pooled"]["rules"]
    assert events.Scalars("rules_pooled/s2q/dmiou_low")[0].value == pytest.approx(
        pooled["s2q"]["vs_zero"]["miou"]["low"], abs=1e-6)
    assert [e.step for e in events.Scalars("rules/oracle/miou")] == [0, 1]
    for i, summary in enumerate(results["seeds"].values()):
        for method in ("zero", "eftnet"):
            logged = {e.step: e.value for e in events.Scalars(f"seed/miou_{method}")}
            assert logged[i] == pytest.approx(summary[method]["miou"], abs=1e-6)
    scores = [e.value for e in events.Scalars("rounds/s2q_score_seed510")]
    assert scores == pytest.approx(results["seeds"][510]["mean_round_scores"], abs=1e-6)
    running = events.Scalars("running/miou_eftnet")
    assert running[4].value == pytest.approx(results["seeds"][510]["eftnet"]["miou"], abs=1e-6)


def test_every_selection_rule_is_reported(full_run):
    results, out = full_run
    pooled = results["rules"]["pooled"]
    assert list(pooled["rules"]) == ["zero", "s2q", "s2q_stop", "soft_vote", "s2q_vote", "stop_vote", "s2q_gt", "last",
                                     "round_1", "round_2", "round_3", "oracle"]
    assert all("vs_s2q" in pooled["rules"][n] for n in pooled["rules"] if n not in ("zero", "s2q"))
    assert pooled["episodes"] == 10 and pooled["with_gt_scores"]
    for seed, summary in results["seeds"].items():
        rules = results["rules"]["per_seed"][seed]["rules"]
        # the label-free rule is the engine's own choice, and the zero round the base model
        assert rules["s2q"]["miou"] == pytest.approx(summary["eftnet"]["miou"], abs=1e-12)
        assert rules["zero"]["fbiou"] == pytest.approx(summary["zero"]["fbiou"], abs=1e-12)
        assert rules["s2q"]["chosen_rounds"][1:] == summary["chosen_rounds"]
        assert rules["s2q"]["vs_zero"]["draws"] == 2000
    text = (out / "results.txt").read_text()
    assert "all 2 seeds pooled: 10 episodes" in text and "oracle round *" in text
    for name in ("round_miou", "round_s2q_scores", "chosen_rounds", "gains", "s2q_score_vs_iou"):
        assert (out / f"plot_{name}.png").stat().st_size > 1000
    assert (out / "episode_counts.json").is_file()


def test_pseudo_mode_never_gives_the_engine_the_query_label(setup, full_run, monkeypatch):
    """The engine sees no query label in pseudo mode (the observer asks for ground-truth scores
    with a label the evaluator holds); and a forced single-round run equals the full run's
    fixed round 1 (the trajectory does not depend on the selection)."""
    from model.eftnet import EFTNet
    root, path = setup
    calls = []
    adapt = EFTNet.adapt

    def spy(self, *args, **kwargs):
        calls.append(kwargs)
        return adapt(self, *args, **kwargs)

    monkeypatch.setattr(EFTNet, "adapt", spy)
    one = run(path, root / "one_round", "ft_number", "1", "num_seeds", "1")
    assert len(calls) == 5
    assert all(c.get("query_mask") is None and c.get("observer") is not None for c in calls)
    fixed = full_run[0]["rules"]["per_seed"][510]["rules"]["round_1"]
    assert one["seeds"][510]["eftnet"]["miou"] == pytest.approx(fixed["miou"], abs=1e-12)


def test_resume_gives_the_same_numbers(setup, full_run, caplog):
    root, path = setup
    results, out = full_run
    resumed = root / "resumed"
    resumed.mkdir()
    for name in ("config.json", "episodes_seed510.json", "episodes_seed365.json"):
        (resumed / name).write_text((out / name).read_text())
    # killed during seed 510's fourth episode: three records and a torn line remain
    lines = (out / "records_seed510_rank0.jsonl").read_text().splitlines()
    (resumed / "records_seed510_rank0.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:40])
    again = run(path, resumed)
    assert seed_numbers(again) == pytest.approx(seed_numbers(results), abs=1e-12)
    records = (resumed / "records_seed510_rank0.jsonl").read_text().splitlines()
    assert len(records) == 5  # 3 kept + only the 2 missing episodes re-run; the torn line removed
    assert [json.loads(r)["episode"] for r in records] == [0, 1, 2, 3, 4]
    assert "records_seed510_rank0.jsonl, line 4: the last record was cut short by a kill" in caplog.text


def test_changed_config_is_not_resumed(setup, full_run, capsys):
    root, path = setup
    with pytest.raises(SystemExit) as exit_info:
        run(path, full_run[1], "q2s_filt_para", "0.3")
    assert exit_info.value.code == 1
    assert "another configuration (q2s_filt_para 0.2 -> 0.3)" in capsys.readouterr().err


@pytest.mark.parametrize("rule", ["s2q_stop", "stop_vote"])
def test_round_selection_answers_as_its_row_of_the_rules_table(setup, full_run, rule):
    """EFTNet's own numbers under another round_selection are that rule's row of the rules table,
    which every run reports (the default run included), on the same episodes."""
    root, path = setup
    results = run(path, root / rule, "round_selection", rule, "num_seeds", "1")
    row = results["rules"]["per_seed"][510]["rules"][rule]
    assert results["seeds"][510]["eftnet"]["miou"] == pytest.approx(row["miou"], abs=1e-12)
    assert results["seeds"][510]["eftnet"]["fbiou"] == pytest.approx(row["fbiou"], abs=1e-12)
    default = full_run[0]["rules"]["per_seed"][510]["rules"]
    assert default[rule]["miou"] == pytest.approx(row["miou"], abs=1e-12)
    assert "vs_s2q" in row and default["s2q"]["miou"] == pytest.approx(full_run[0]["seeds"][510]["eftnet"]["miou"])
    chosen = results["seeds"][510]["chosen_rounds"]
    assert (sum(chosen) == 5) if rule == "s2q_stop" else chosen == []  # a vote answers with no round


def test_base_only_and_ground_truth_modes(setup):
    root, path = setup
    base = run(path, root / "base", "loop_ft", "False", "num_seeds", "1")
    assert "eftnet" not in base and base["s2q_query_mask"] is None
    truth = run(path, root / "truth", "s2q_query_mask", "ground_truth", "num_seeds", "1")
    assert truth["uses_query_labels"] is True
    assert "ground-truth label" in (root / "truth" / "results.txt").read_text()
    # The label-free run's reference rule (s2q with the query's ground truth, asked of the
    # observer probe) is exactly what a ground_truth run returns, on the same episodes.
    full = json.loads((root / "full" / "results.json").read_text()) if (root / "full").is_dir() else \
        run(path, root / "full")
    reference_rule = full["rules"]["per_seed"]["510"]["rules"]["s2q_gt"]
    assert reference_rule["miou"] == pytest.approx(truth["seeds"][510]["eftnet"]["miou"], abs=1e-12)
    assert reference_rule["fbiou"] == pytest.approx(truth["seeds"][510]["eftnet"]["fbiou"], abs=1e-12)
    assert "s2q" not in truth["rules"]["pooled"]["rules"]  # the ground_truth run has no label-free scores
    # the zero round is the plain base model whatever the EFTNet settings
    assert truth["seeds"][510]["zero"]["miou"] == pytest.approx(base["seeds"][510]["zero"]["miou"], abs=1e-12)


def test_torchrun_two_processes_equal_one(setup, full_run):
    root, path = setup
    results, _ = full_run
    out = root / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           str(REPO / "meta_test.py"), "--config", str(path), "--exp-dir", str(out)]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ddp = json.loads((out / "results.json").read_text())
    assert [float(v) for v in seed_numbers(ddp)] == pytest.approx(seed_numbers(results), abs=1e-12)
    assert sorted(p.name for p in out.glob("records_seed510_rank*.jsonl")) == \
        ["records_seed510_rank0.jsonl", "records_seed510_rank1.jsonl"]


def test_hsnet_runs_from_a_released_format_file_without_base_learner_numbers(setup):
    """``--arch HSNet`` with a file saved as HSNet's releases are (DataParallel keys): both
    methods are measured, and no base-class number is made up for a model without a base learner."""
    from model import HSNet
    root, path = setup
    torch.manual_seed(0)
    model = HSNet("mobilenetv2", widths=(4, 8, 8))
    with torch.no_grad():
        model.hpn_learner.decoder2[-1].bias.copy_(torch.tensor([0.0, 0.3]))  # a mix of fg and bg
    weights = root / "hsnet_best_model.pt"
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, weights)
    out = root / "hsnet"
    opts = ("arch", "HSNet", "hsnet_widths", "[4,4,8]", "weight_path", str(weights), "num_seeds", "1", "test_num", "3")
    with pytest.raises(SystemExit):  # another width than the file's: refused, not loaded partly
        run(path, out, *opts)
    opts = opts[:3] + ("[4,8,8]",) + opts[4:]
    results = run(path, out, *opts, restart=True)
    summary = results["seeds"][510]
    assert summary["episodes"] == 3 and summary["base_miou"] is None
    assert 0 < summary["zero"]["fbiou"] < 1 and len(summary["mean_round_scores"]) == 3
    records = [json.loads(line) for line in (out / "records_seed510_rank0.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all("base" not in r and "eftnet" in r for r in records)
    table = (out / "results.txt").read_text()
    assert "HSNet mobilenetv2 demo fold 0" in table and "mIoU EFTNet" in table and "base-cls" not in table
    assert seed_numbers(run(path, out, *opts)) == seed_numbers(results)  # resumed: every record read back
