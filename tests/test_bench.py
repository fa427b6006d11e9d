"""`python -m nanovlm.bench --quick`: it runs end to end and its JSON holds sane numbers (tiny sizes, CPU)."""

import json
import math
import os
import subprocess
import sys

import pytest

from nanovlm import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    bench.main(["--quick", "--repeats=1", "--dtypes=float32,bfloat16", f"--out={out}"])
    with open(out) as f:
        return json.load(f)


@pytest.mark.slow  # the bench --quick takes ~50 s; `pytest -m slow tests/test_bench.py`
def test_same_weights_give_the_same_loss(report):
    for kind in ("fixed", "video"):
        losses = report["loss_check"][kind]
        assert set(losses) == {"nanovlm", "nanovlm compiled", "transformers"}
        assert max(losses.values()) - min(losses.values()) < 1e-4, losses
        assert 3 < losses["nanovlm"] < 8  # a random-init LM over 256 tokens: about ln(256) = 5.5


@pytest.mark.slow  # the bench --quick takes ~50 s; `pytest -m slow tests/test_bench.py`
def test_throughput_rows(report):
    rows = report["throughput"]
    assert {(r["batch"], r["dtype"], r["model"]) for r in rows} == {
        (b, d, m) for b in ("fixed", "video") for d in ("float32", "bfloat16") for m in ("nanovlm", "nanovlm compiled", "transformers")}
    for r in rows:
        assert r["step_s"] > 0 and r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1, r
    # the same samples: packed into 2 rows for nanovlm, one padded row each for transformers
    video = {r["model"]: r for r in rows if r["batch"] == "video" and r["dtype"] == "float32"}
    assert video["nanovlm"]["shape"][0] == 2 < video["transformers"]["shape"][0] == video["nanovlm"]["samples"]


@pytest.mark.slow  # the bench --quick takes ~50 s; `pytest -m slow tests/test_bench.py`
def test_memory_ranks_and_data(report):
    for peaks in report["checkpointing"]["peak_bytes"].values():
        assert peaks["off"] > 1e8 and peaks["on"] > 1e8  # process RSS: at least the libraries
        assert 0 < peaks["held_before"] < min(peaks["off"], peaks["on"])
    one, two = report["ranks"]
    assert (one["ranks"], two["ranks"]) == (1, 2)
    # FSDP shards parameters and optimizer state: each of 2 ranks holds about half (plus unsharded remainders)
    assert two["param_optimizer_bytes_per_rank"] <= 0.55 * one["param_optimizer_bytes_per_rank"]
    assert report["data"]["full_clips_per_s"] > 0 and report["data"]["raw_clips_per_s"] > 0
    assert report["data"]["size"] == 224  # SSv2-sized clips (427x240 VP9) resized to a 224 px tower
    lora = report["lora"]  # LoRA trains a sliver: far less gradient and optimizer state than the LM in full
    assert lora["lora"]["trained_params"] < lora["full"]["trained_params"]
    assert lora["grad_optimizer_ratio"] < 1 and lora["held_ratio"] < 1 and lora["step_s"]["lora"] > 0


def test_check_runs_the_gpu_paths_on_this_device(tmp_path):
    """`python -m nanovlm.check` is what a GPU machine runs (varlen attention against per-sample SDPA, bf16 FSDP
    steps with activation checkpointing and compiled blocks); --quick on the CPU runs the same code."""
    out = tmp_path / "check.json"
    result = subprocess.run([sys.executable, "-m", "nanovlm.check", "--device=cpu", "--quick",
                             f"--out={out}"], capture_output=True, text=True, timeout=600, cwd=ROOT,
                            env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["attention"]["kernel"] == "SDPA with a mask"  # no varlen kernel on a CPU
    for window in ("window=None", "window=16"):
        assert report["attention"][window]["out"] < 1e-5 and report["attention"][window]["grads"] < 1e-5
    assert len(report["steps"]) == 6 and all(math.isfinite(s["loss"]) for s in report["steps"])
    assert len({tuple(s["shape"]) for s in report["steps"]}) > 1  # the rows change shape from step to step
    assert 1 <= report["compiles"]["lm block"] <= 3 and report["peak_memory_gb"] > 0 and report["mfu"] > 0
