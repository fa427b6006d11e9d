"""Checkpoints of an FSDP2-sharded model on gloo ranks: bit-exact resume, frozen params left out, atomic dirs."""

import json
import os
import random

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
import torch.nn as nn
from safetensors.torch import load_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard

from nanovlm import checkpoint
from nanovlm.lifecycle import end_distributed

K_STEPS, M_STEPS = 3, 3  # train K, save after each step, train M more; the resumed run replays those M


def build(world: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)  # identical full weights on every rank before sharding, as if loaded from a checkpoint
    model = nn.Sequential(
        nn.Sequential(nn.Linear(8, 16), nn.GELU()),  # "pretrained tower": frozen, so never saved
        nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Dropout(0.5), nn.Linear(16, 4)),
    )
    model[0].requires_grad_(False)
    mesh = init_device_mesh("cpu", (world,))
    for block in model:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for module in model.modules():  # the trainer sums gradients and divides by the global token count itself
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return model, optimizer


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> float:
    # torch (inputs, dropout), python and numpy generators all feed the loss, so each must be restored per rank
    inputs = torch.randn(4, 8) * (1 + random.random()) + float(np.random.rand())
    loss = model(inputs).square().mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


def worker(rank: int, world: int, root: str, phase: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{root}/pg-{phase}", rank=rank, world_size=world)
    model, optimizer = build(world)
    seed = 1000 * (phase == "resume") + rank  # the resumed run only matches if load() restores the RNG
    torch.manual_seed(seed), random.seed(seed), np.random.seed(seed)
    ckpt_root, losses = os.path.join(root, "ckpt"), []
    if phase == "first":
        for step in range(1, K_STEPS + 1):
            train_step(model, optimizer)
            checkpoint.save(ckpt_root, step, model, optimizer, {"step": step}, keep_last=2)
        losses = [train_step(model, optimizer) for _ in range(M_STEPS)]
        trainable = [name for name, p in model.named_parameters() if p.requires_grad]
        checkpoint.write_safetensors(checkpoint.gather(model, trainable), os.path.join(root, "model.safetensors"))
        full = {name: p.full_tensor() for name, p in model.named_parameters() if p.requires_grad}
        if rank == 0:
            exported = load_file(os.path.join(root, "model.safetensors"))
            assert exported.keys() == full.keys(), (exported.keys(), full.keys())
            for name, tensor in full.items():
                assert torch.equal(exported[name], tensor), name
    else:
        path = checkpoint.latest(ckpt_root)
        assert path == os.path.join(ckpt_root, f"step_{K_STEPS:06d}"), path
        assert checkpoint.load(path, model, optimizer) == ({"step": K_STEPS}, True)
        losses = [train_step(model, optimizer) for _ in range(M_STEPS)]
    with open(os.path.join(root, f"losses-{phase}-rank{rank}.json"), "w") as f:
        json.dump(losses, f)
    del model, optimizer
    end_distributed()


@pytest.mark.parametrize("world", [1, 2])
def test_resume_is_bit_exact(tmp_path, world):
    for phase in ("first", "resume"):  # separate processes: nothing survives but the checkpoint files
        mp.spawn(worker, args=(world, str(tmp_path), phase), nprocs=world)
    losses = {(phase, rank): json.load(open(tmp_path / f"losses-{phase}-rank{rank}.json"))
              for phase in ("first", "resume") for rank in range(world)}
    for rank in range(world):
        assert losses["resume", rank] == losses["first", rank]  # exact float equality, not allclose
    if world == 2:
        assert losses["first", 0] != losses["first", 1]  # ranks draw different randoms, so a swap would show
    kept = sorted(os.listdir(tmp_path / "ckpt"))
    assert kept == ["step_000002", "step_000003"]  # keep_last=2 of 3 saves
    saved = dcp.FileSystemReader(str(tmp_path / "ckpt" / "step_000003")).read_metadata().state_dict_metadata
    weights = {k for k in saved if k.startswith("model.")}
    assert weights == {f"model.1.{i}.{p}" for i in (0, 3) for p in ("weight", "bias")}  # no frozen model.0.*


def test_latest_ignores_and_removes_incomplete(tmp_path):
    assert checkpoint.latest(str(tmp_path / "missing")) is None
    for name in ("step_000005", "step_000020"):  # complete
        os.makedirs(tmp_path / name)
        (tmp_path / name / checkpoint.MARKER).write_text("{}")
    os.makedirs(tmp_path / "step_000030")  # no marker: crashed before completing
    os.makedirs(tmp_path / ".tmp-step_000040")  # crashed while writing
    os.makedirs(tmp_path / "unrelated")
    assert checkpoint.latest(str(tmp_path)) == str(tmp_path / "step_000020")  # by number, not name order
    assert sorted(os.listdir(tmp_path)) == ["step_000005", "step_000020", "unrelated"]


def test_load_rejects_mismatched_checkpoint(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        model, optimizer = build(1)
        path = checkpoint.save(str(tmp_path / "ckpt"), 1, model, optimizer, {})
        unfrozen, _ = build(1)
        unfrozen[0].requires_grad_(True)  # the "tower" is trainable now, but the checkpoint has no weights for it
        with pytest.raises(ValueError, match=r"trainable here but not saved: \['0.0.bias', '0.0.weight'\]"):
            checkpoint.load(path, unfrozen, torch.optim.AdamW(unfrozen.parameters()))
        os.remove(os.path.join(path, checkpoint.MARKER))
        with pytest.raises(ValueError, match="not a complete checkpoint"):
            checkpoint.load(path, model, optimizer)
    finally:
        dist.destroy_process_group()


def reshard_worker(rank: int, world: int, root: str, phase: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{root}/pg-{phase}", rank=rank, world_size=world)
    model, optimizer = build(world)
    if phase == "save":
        for _ in range(2):
            train_step(model, optimizer)
        checkpoint.save(os.path.join(root, "ckpt"), 2, model, optimizer, {"step": 2, "data_position": [0, 8]})
    else:
        extra, exact = checkpoint.load(checkpoint.latest(os.path.join(root, "ckpt")), model, optimizer)
        assert extra == {"step": 2, "data_position": [0, 8]} and exact == (world == 2)
    weights = {k: v.full_tensor() for k, v in model.state_dict().items()}
    state = {f"{k}.{name}": v.full_tensor() for k, s in optimizer.state_dict()["state"].items()
             for name, v in s.items() if hasattr(v, "full_tensor")}
    if rank == 0:
        torch.save({"weights": weights, "optimizer": state}, os.path.join(root, f"{phase}-{world}.pt"))
    del model, optimizer
    end_distributed()


def test_a_checkpoint_of_two_ranks_loads_on_one(tmp_path):
    """DCP reshards: weights and AdamW state saved by 2 ranks come back whole on 1; RNG states cannot (load says)."""
    mp.spawn(reshard_worker, args=(2, str(tmp_path), "save"), nprocs=2)
    mp.spawn(reshard_worker, args=(1, str(tmp_path), "load"), nprocs=1)
    saved, loaded = torch.load(tmp_path / "save-2.pt"), torch.load(tmp_path / "load-1.pt")
    for part in ("weights", "optimizer"):
        assert saved[part].keys() == loaded[part].keys() and saved[part]
        for key, tensor in saved[part].items():
            assert torch.equal(tensor, loaded[part][key]), key
