"""train.py end to end on a tiny synthetic dataset (CPU, gloo): ranks, resume, nodes, stages, configs."""

import json
import os
import re
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import prepare
from conftest import run_args
import train
from nanovlm.model import VISUAL_TOKEN, from_pretrained, vlm_config
from nanovlm.parallel import build_sharded

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, nproc=1, extra=(), **env):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *extra,
           os.path.join(ROOT, "train.py"), *args] if nproc else [sys.executable, os.path.join(ROOT, "train.py"), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, **env)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def losses(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return {m["step"]: m["loss"] for m in map(json.loads, f) if "loss" in m}


def test_config_typo_fails_before_any_work(tmp_path):
    out_dir = tmp_path / "out"
    result = launch([f"--out_dir={out_dir}", "--learing_rate=1e-3"], nproc=0)
    assert result.returncode == 2
    assert "did you mean 'learning_rate'?" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out_dir.exists()


def test_one_rank_equals_two_ranks_and_resume(synthetic, tmp_path):
    one = launch(run_args(synthetic, tmp_path / "one", max_steps=12), nproc=1)
    assert one.returncode == 0, one.stderr[-3000:]
    two = launch(run_args(synthetic, tmp_path / "two", max_steps=12, ckpt_interval=6), nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(a) == list(range(1, 13))
    for step in a:  # the same global batch: 1 rank x 2 micro-steps == 2 ranks x 1
        assert abs(a[step] - b[step]) <= 1e-5, (step, a[step], b[step])
    assert a[12] < a[1]
    # interrupted after step 6: drop everything after it, resume, and the losses continue exactly
    ckpt = tmp_path / "two" / "ckpt"
    assert sorted(os.listdir(ckpt)) == ["step_000006", "step_000012"]
    subprocess.run(["rm", "-rf", str(ckpt / "step_000012"), str(tmp_path / "two" / "final")], check=True)
    resumed = launch(run_args(synthetic, tmp_path / "two", max_steps=12, resume=True), nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    with open(tmp_path / "two" / "log.jsonl") as f:
        after = [m for m in map(json.loads, f) if "loss" in m][12:]
    assert [m["step"] for m in after] == list(range(7, 13))
    assert all(m["loss"] == b[m["step"]] for m in after)  # bit for bit
    # the same 2-rank checkpoint of step 6, resumed on one rank: resharded, the same samples, the same losses
    # to float rounding (the RNG states are re-derived, and said so)
    subprocess.run(["cp", "-r", str(tmp_path / "two"), str(tmp_path / "moved")], check=True)
    subprocess.run(["rm", "-rf", str(tmp_path / "moved" / "ckpt" / "step_000012")], check=True)
    moved = launch(run_args(synthetic, tmp_path / "moved", max_steps=12, resume=True), nproc=1)
    assert moved.returncode == 0, moved.stderr[-3000:]
    assert "saved by another number of ranks" in moved.stdout and "bit-exact only on" in moved.stdout
    with open(tmp_path / "moved" / "log.jsonl") as f:
        after = [m for m in map(json.loads, f) if "loss" in m][18:]
    assert [m["step"] for m in after] == list(range(7, 13))
    assert all(abs(m["loss"] - b[m["step"]]) <= 1e-5 for m in after), [(m["loss"], b[m["step"]]) for m in after]


def test_resume_on_other_ranks_sees_every_sample_once(synthetic):
    """Rows of a step are the same whatever the ranks: 10 steps on 2 ranks then 10 on 1 rank consume exactly the
    rows of 20 uninterrupted steps on 2 ranks, across an epoch boundary, none twice (4 rows a step)."""
    from nanovlm.data import RowSampler

    class Plan:  # what RowSampler reads of a dataset: lengths, frames and the row budget
        lengths, frame_counts, max_tokens = [10] * 52, [0] * 52, 20  # 26 rows an epoch: 6 steps, 2 rows dropped
        sizes, weights = [52], [1.0]  # one dataset

    def batches(sampler, start):  # TrainBatches' bookkeeping, without loading anything
        epoch, row = start
        while True:
            sampler.set_epoch(epoch, row)
            for keys in sampler:
                row += sampler.world_size * sampler.micro_batch
                yield keys, (epoch, row)
            epoch, row = epoch + 1, 0

    def consumed(world, micro, steps, start=(0, 0)):
        ranks = [batches(RowSampler(Plan, micro, 8, rank, world, seed=1, rows_per_step=4), start)
                 for rank in range(world)]
        keys, position = [], start
        for _ in range(steps * 4 // (world * micro)):  # micro-steps
            for rank in ranks:
                batch, position = next(rank)
                keys += [(e, i) for e, _, i in batch]
        return keys, position

    uninterrupted, _ = consumed(2, 2, 20)
    first, position = consumed(2, 2, 10)
    rest, _ = consumed(1, 2, 10, position)
    assert sorted(first + rest) == sorted(uninterrupted) and len(set(uninterrupted)) == len(uninterrupted)
    assert {e for e, _ in uninterrupted} == {0, 1, 2, 3}  # across epoch boundaries


@pytest.mark.slow  # 10 s; `pytest -m slow tests/test_train.py`
def test_two_nodes_on_one_machine(synthetic, tmp_path):
    port = free_port()
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}",
               "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}",
               os.path.join(ROOT, "train.py"), *run_args(synthetic, tmp_path / "out", max_steps=3)]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    assert sorted(losses(tmp_path / "out")) == [1, 2, 3]
    with open(tmp_path / "out" / "config.json") as f:
        assert json.load(f)["max_steps"] == 3


def test_compiled_blocks_train_as_eager_ones(synthetic, tmp_path):
    """compile=True (the default): blocks compiled under FSDP on 2 ranks with activation checkpointing and LoRA
    adapters on the LM give the losses of eager blocks on 1 rank; over 12 steps of packed rows whose lengths and frame counts change every step, each
    block recompiles at most twice; evaluation (generation with a KV cache) runs eager instead of recompiling the
    blocks."""
    common = dict(max_steps=12, activation_checkpointing=True, eval_interval=6, eval_samples=4, lora_rank=4,
                  lora_dropout=0.0)  # the LM through LoRA adapters (the tower and projector in full)
    eager = launch(run_args(synthetic, tmp_path / "eager", **common), nproc=1)  # 1 rank, eager
    assert eager.returncode == 0, eager.stderr[-3000:]
    cache = tmp_path / "inductor"
    compiled = launch(run_args(synthetic, tmp_path / "compiled", **dict(common, compile=True)), nproc=2,
                      TORCHINDUCTOR_CACHE_DIR=str(cache), TORCH_LOGS="recompiles")
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    assert any(cache.rglob("*.py")), "nothing was compiled"
    a, b = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert sorted(a) == sorted(b) == list(range(1, 13))
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-5, (step, a[step], b[step])
    with open(tmp_path / "eager" / "log.jsonl") as f, open(tmp_path / "compiled" / "log.jsonl") as g:
        evals = [[m for m in map(json.loads, h) if "val_loss" in m] for h in (f, g)]
    assert [m["step"] for m in evals[0]] == [m["step"] for m in evals[1]] == [6, 12]
    for e, c in zip(*evals):
        assert e["val_accuracy"] == c["val_accuracy"] and abs(e["val_loss"] - c["val_loss"]) <= 1e-5
    # dynamo's recompile log: "[rank0]:... Recompiling function forward in .../nanovlm/lm.py:264"
    recompiles = re.findall(r"\[(rank\d)\].*Recompiling function (\w+) in (\S+)", compiled.stderr)
    blocks = [(rank, block) for rank, _, block in recompiles]
    assert all(block.split(":")[0].endswith(("lm.py", "vision.py")) for _, block in blocks), recompiles
    # each block at most twice: dynamic shapes after the first, and a row of one unpadded sample (SDPA's causal
    # kernel, no mask) once
    assert all(blocks.count(b) <= 2 for b in blocks), recompiles


@pytest.fixture
def process_group():
    store = dist.HashStore()
    dist.init_process_group("gloo", rank=0, world_size=1, store=store)
    yield
    dist.destroy_process_group()


def tiny_batch(model):
    n = model.cfg.tokens_per_frame * 2
    ids = torch.tensor([[1, 5] + [VISUAL_TOKEN] * n + [7, 8, 9, 2]])
    targets = torch.full_like(ids, -100)
    targets[0, -4:-1] = ids[0, -3:]
    return ids, torch.randn(2, 3, 64, 64), targets


def test_frozen_stage_gets_no_gradient_and_does_not_change(synthetic, process_group):
    c = train.settings(run_args(synthetic, "unused", train_lm=False, train_vision=False))
    cfg = vlm_config(c.vision_path, c.lm_path)
    model = build_sharded(cfg, torch.device("cpu"), c.vision_path, c.lm_path,
                          trainable={"vision": c.train_vision, "projector": c.train_projector, "lm": c.train_lm})
    optimizer = train.make_optimizer(model, c)
    before = {k: v.full_tensor().clone() for k, v in model.state_dict().items()}
    ids, frames, targets = tiny_batch(model)
    loss, _ = model(ids, frames, targets)
    loss.backward()
    optimizer.step()
    for name, p in model.named_parameters():
        trained = name.startswith("projector.")
        assert (p.grad is not None) == trained, name
        changed = not torch.equal(p.full_tensor(), before[name])
        assert changed == trained, name


def test_activation_checkpointing_gives_the_same_gradients(synthetic):
    model = from_pretrained(f"{synthetic}/vision", f"{synthetic}/lm")
    ids, frames, targets = tiny_batch(model)
    grads = []
    for on in (False, True):
        model.lm.grad_checkpointing = model.vision.grad_checkpointing = on
        model.zero_grad()
        model(ids, frames, targets)[0].backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], atol=1e-6, rtol=1e-5)


@pytest.mark.slow  # 17 s; label-set evaluation and eval_only on 2 ranks also run in test_scale.py
def test_label_set_evaluation_on_two_ranks_and_eval_only(synthetic, tmp_path):
    out = tmp_path / "out"
    args = run_args(synthetic, out, max_steps=2, eval_samples=8, eval_label_set=True)
    result = launch(args, nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(out / "log.jsonl") as f:
        [metrics] = [m for m in map(json.loads, f) if "val_top1" in m]
    templates = {t for t, _ in prepare.SYNTH_CLASSES}
    for name in ("", "_shuffled"):  # frames in order, and shuffled within each clip
        assert 0 <= metrics[f"val_top1{name}"] <= metrics[f"val_top5{name}"] <= 1
        assert set(metrics[f"val_per_class{name}"]) == templates
        assert len(metrics[f"val_pairs{name}"]) == 3  # left/right, up/down, towards/away from the camera
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out), size_guidance={"images": 0}).Reload()
    assert {"val_clip_0", "val_clip_3"} <= set(events.Tags()["images"])  # frame strips of the evaluation
    image = events.Images("val_clip_0")[0]
    assert (image.width, image.height) == (2 * 64, 64)  # num_frames=2 frames side by side
    # eval_only on the checkpoint of step 2 reproduces the evaluation made at step 2
    result = launch(run_args(synthetic, out, max_steps=2, eval_samples=8, eval_label_set=True, eval_only=True,
                             resume=True), nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(out / "eval.json") as f:
        again = json.load(f)
    for key in ("val_loss", "val_accuracy", "val_top1", "val_top1_shuffled", "val_per_class_shuffled"):
        assert again[key] == pytest.approx(metrics[key], abs=1e-6), key
