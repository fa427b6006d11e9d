"""`python -m nanovlm.bench --quick`: it runs end to end and its JSON holds sane numbers (tiny sizes, CPU)."""

import json

import pytest

from nanovlm import bench


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    bench.main(["--quick", "--repeats=1", f"--out={out}"])
    with open(out) as f:
        return json.load(f)


def test_same_weights_give_the_same_loss(report):
    for kind in ("fixed", "video"):
        losses = report["loss_check"][kind]
        assert set(losses) == {"nanovlm", "nanovlm compiled", "transformers"}
        assert max(losses.values()) - min(losses.values()) < 1e-4, losses
        assert 3 < losses["nanovlm"] < 8  # a random-init LM over 256 tokens: about ln(256) = 5.5


def test_throughput_rows(report):
    rows = report["throughput"]
    assert {(r["batch"], r["dtype"], r["model"]) for r in rows} == {
        (b, d, m) for b in ("fixed", "video") for d in ("float32", "bfloat16") for m in ("nanovlm", "nanovlm compiled", "transformers")}
    for r in rows:
        assert r["step_s"] > 0 and r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1, r
    # the same samples: packed into 2 rows for nanovlm, one padded row each for transformers
    video = {r["model"]: r for r in rows if r["batch"] == "video" and r["dtype"] == "float32"}
    assert video["nanovlm"]["shape"][0] == 2 < video["transformers"]["shape"][0] == video["nanovlm"]["samples"]


def test_memory_ranks_and_data(report):
    for peaks in report["checkpointing"]["peak_bytes"].values():
        assert peaks["off"] > 1e8 and peaks["on"] > 1e8  # process RSS: at least the libraries
        assert 0 < peaks["held_before"] < min(peaks["off"], peaks["on"])
    one, two = report["ranks"]
    assert (one["ranks"], two["ranks"]) == (1, 2)
    # FSDP shards parameters and optimizer state: each of 2 ranks holds about half (plus unsharded remainders)
    assert two["param_optimizer_bytes_per_rank"] <= 0.55 * one["param_optimizer_bytes_per_rank"]
    assert report["data"]["full_clips_per_s"] > 0 and report["data"]["raw_clips_per_s"] > 0
