"""The CUDA path gives the CPU's numbers (float32, TF32 off). Skipped where CUDA is absent.

`bash benchmarks/gpu_check.sh` runs these and the GPU benchmark on a machine with a GPU.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.common import predict_foreground, random_episode
from model import BAM, MSANet
from model.eftnet import EFTNet, EFTNetSettings

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

REPO = Path(__file__).resolve().parents[1]
CPU, GPU = torch.device("cpu"), torch.device("cuda")
DEMO = REPO / "config" / "demo" / "demo_split0_mobilenetv2.yaml"


@pytest.fixture(autouse=True)
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def on(device: torch.device, episode: dict) -> dict:
    return {k: v.to(device) for k, v in episode.items()}


def build(arch: str, backbone: str, shot: int, size: int) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(0)
    model = (MSANet if arch == "MSANet" else BAM)(backbone, shot, 15).eval()
    episode = random_episode(size, shot, CPU)
    predict_foreground(model, episode)
    return model, episode


@pytest.mark.parametrize("arch, backbone, shot", [("MSANet", "resnet50", 1), ("MSANet", "vgg", 2),
                                                  ("BAM", "resnet50", 2)])
def test_forward_on_cuda_equals_cpu(arch, backbone, shot):
    model, episode = build(arch, backbone, shot, 121)
    with torch.no_grad():
        cpu = model(episode["query_img"], episode["support_imgs"], episode["support_masks"])
        model.to(GPU)
        ep = on(GPU, episode)
        gpu = model(ep["query_img"], ep["support_imgs"], ep["support_masks"])
    for name in ("final", "meta", "base"):
        assert torch.allclose(getattr(gpu, name).cpu(), getattr(cpu, name), atol=1e-4), name


@pytest.mark.parametrize("arch, backbone, shot", [("MSANet", "resnet50", 1), ("MSANet", "resnet50", 2),
                                                  ("BAM", "vgg", 1)])
def test_episode_on_cuda_equals_cpu(arch, backbone, shot):
    model, episode = build(arch, backbone, shot, 121)
    settings = EFTNetSettings(aux_weight=0.9)

    def adapt(device: torch.device):
        ep = on(device, episode)
        return EFTNet(model.to(device), settings).adapt(ep["query_img"], ep["support_imgs"], ep["support_masks"],
                                                        ep["padding"])

    cpu, gpu = adapt(CPU), adapt(GPU)
    assert gpu.chosen_round == cpu.chosen_round
    assert gpu.round_scores == pytest.approx(cpu.round_scores, abs=1e-4)
    for name in ("final", "meta", "base"):
        assert torch.allclose(getattr(gpu, name).cpu(), getattr(cpu, name), atol=1e-4), name
    for a, b in zip(gpu.rounds, cpu.rounds):
        assert torch.equal(a.q2s_mask.cpu(), b.q2s_mask)


def meta_test(out: Path, device: str, processes: int = 1) -> dict:
    """A demo fold, 6 episodes x 1 seed, as a user runs it (TF32 off for the comparison)."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "NVIDIA_TF32_OVERRIDE": "0", "PYTHONPATH": path}
    launch = [sys.executable] if processes == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", "29531"]
    cmd = [*launch, str(REPO / "meta_test.py"), "--config", str(DEMO), "--exp-dir", str(out),
           "--opts", "device", device, "test_num", "6", "num_seeds", "1"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


def chosen_rounds(out: Path) -> dict[int, int]:
    return {r["episode"]: r["rounds"]["chosen"] for path in out.glob("records_seed*.jsonl")
            for r in map(json.loads, path.read_text().splitlines())}


def numbers(results: dict) -> list[float]:
    return [s[m][k] for s in results["seeds"].values() for m in ("zero", "eftnet") for k in ("miou", "fbiou")]


@pytest.fixture(scope="module")
def cuda_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cuda") / "run"
    return meta_test(out, "cuda"), out


def test_meta_test_demo_fold_on_cuda_equals_cpu(cuda_run, tmp_path):
    gpu, gpu_out = cuda_run
    cpu = meta_test(tmp_path / "cpu", "cpu")
    assert numbers(gpu) == pytest.approx(numbers(cpu), abs=1e-4)
    assert chosen_rounds(gpu_out) == chosen_rounds(tmp_path / "cpu")


def test_torchrun_two_processes_on_one_gpu_equal_one(cuda_run, tmp_path):
    gpu, gpu_out = cuda_run
    two = meta_test(tmp_path / "two", "cuda", processes=2)
    assert numbers(two) == pytest.approx(numbers(gpu), abs=1e-9)
    assert chosen_rounds(tmp_path / "two") == chosen_rounds(gpu_out)
    assert len(list((tmp_path / "two").glob("records_seed*_rank*.jsonl"))) == 2
