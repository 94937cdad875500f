"""`bash meta_test.sh` (the README's main job) end to end on a tiny setting, as a newcomer runs it."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not (REPO / "weights" / "demo" / "split0" / "mobilenetv2" / "demo_split0.pth").exists(),
                    reason="the committed demo checkpoints are missing")
def test_meta_test_sh_on_two_demo_folds(tmp_path):
    demo = tmp_path / "demo"
    opts = f"test_num 3 num_seeds 1 workers 0 data_root {demo} lists_root {demo}/lists"
    env = {**os.environ, "OPTS": opts, "EXP": str(tmp_path / "exp"), "TAG": "tiny"}
    done = subprocess.run(["bash", "meta_test.sh", "demo", "mobilenetv2", "1", "0", "1"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    out = tmp_path / "exp" / "demo" / "MSANet_mobilenetv2_1shot" / "tiny"
    for split in (0, 1):
        results = json.loads((out / f"split{split}" / "results.json").read_text())
        assert results["split"] == split and results["uses_query_labels"] is False
        assert results["seeds"]["510"]["episodes"] == 3
        assert (out / f"split{split}" / "tensorboard").is_dir()
    summary = (out / "summary.txt").read_text()
    assert "mIoU EFTNet" in summary and summary.count("\n") >= 5
    # every selection rule over the folds, with the paired interval of the mean
    assert "EFTNet s2q, label-free" in summary and "EFTNet s2q, query GT *" in summary
    assert "95% interval" in summary and "a fold lacks" not in summary
    assert "mean |" in done.stdout
    assert (demo / "demo_manifest.json").exists()  # generated on first use


def test_meta_test_sh_bad_input_is_one_message(tmp_path):
    env = {**os.environ, "OPTS": "shto 2", "EXP": str(tmp_path / "exp"), "TAG": "bad"}
    done = subprocess.run(["bash", "meta_test.sh", "demo", "mobilenetv2", "1", "0"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert "Traceback" not in output
    assert "meta_test.py: error: unknown config key 'shto' in --opts; did you mean" in output
    assert not (tmp_path / "exp" / "demo" / "MSANet_mobilenetv2_1shot" / "bad" / "summary.txt").exists()


@pytest.mark.skipif(not (REPO / "weights" / "demo" / "split0" / "mobilenetv2" / "demo_split0.pth").exists(),
                    reason="the committed demo checkpoints are missing")
def test_ablation_sh_gives_one_table_of_variants(tmp_path):
    demo = tmp_path / "demo"
    env = {**os.environ, "OPTS": f"test_num 3 num_seeds 1 workers 0 data_root {demo} lists_root {demo}/lists",
           "EXP": str(tmp_path / "exp"), "VARIANTS": "reference:\nno_q2s: q2s_blend False"}
    done = subprocess.run(["bash", "ablation.sh", "demo", "mobilenetv2", "1", "0"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    root = tmp_path / "exp" / "demo" / "MSANet_mobilenetv2_1shot"
    reference = json.loads((root / "ablation_reference" / "split0" / "results.json").read_text())
    no_q2s = json.loads((root / "ablation_no_q2s" / "split0" / "results.json").read_text())
    def setting(variant: str) -> bool:
        return json.loads((root / variant / "split0" / "config.json").read_text())["config"]["q2s_blend"]
    assert setting("ablation_reference") is True and setting("ablation_no_q2s") is False
    rows = {line.split("|")[0].strip(): line for line in (root / "ablation.txt").read_text().splitlines()}
    assert {"reference", "no discrimination (last)", "no_q2s"} <= set(rows)
    for name, results, rule in (("reference", reference, "s2q"), ("no discrimination (last)", reference, "last"),
                                ("no_q2s", no_q2s, "s2q")):
        gain = 100 * results["rules"]["pooled"]["rules"][rule]["vs_zero"]["miou"]["point"]
        assert f"{gain:+7.2f}" in rows[name].split("|")[1]
