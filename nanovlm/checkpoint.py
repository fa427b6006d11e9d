"""Crash-safe distributed checkpoints with torch.distributed.checkpoint (DCP).

A checkpoint is a directory ckpt_root/step_000123/ holding
    .metadata, __<rank>_0.distcp   DCP shards of {"model": trainable weights, "optim": optimizer state}
    rank<r>.pt                     rank r's RNG states
    COMPLETE                       {"step", "world_size", "extra"}, written last: `extra` is the run's global
                                   state (its step, its data position as a global count of rows)

What is notable:
- Only trainable weights are saved; frozen ones come from the pretrained towers. StateDictOptions(
  ignore_frozen_params=True) drops them from the state dict on save, and on load builds a template
  without them, which DCP fills (failing on any key the checkpoint lacks) and set_state_dict(strict=False)
  copies in, leaving the frozen parameters as they are. Before loading we compare the checkpoint's weight
  names with the template's, so resuming with a different set of frozen parameters is an error, not a
  silently partial load.
- Atomic: everything is written to ckpt_root/.tmp-step_000123; when all ranks are done (barrier), rank 0
  writes COMPLETE and renames the directory into place (a rename is atomic on POSIX): that rename is the
  commit. Old checkpoints beyond keep_last are deleted only after it, each losing its COMPLETE marker before
  its files, so a kill half-way through a deletion leaves an incomplete directory, never one that looks
  complete. Saving a step that already exists renames the old copy aside first; latest() puts it back if
  the kill came between the two renames. tests/test_reliability.py kills a save before every file-system
  call it makes (mkdir, fsync, rename, unlink, ...) and checks that latest() always finds a complete one.
- Any number of ranks can load a checkpoint: DCP reshards weights and optimizer state to the loading ranks'
  layout. RNG states are per rank (torch CPU, CUDA, python, numpy): on the same number of ranks rank r gets its
  own back and the run continues bit for bit; on another number, load() says so, and the caller re-derives them.
- save/load/gather/write_safetensors are collective (call them on every rank) and need a process group, even
  with one process (the trainer always starts one, gloo on CPU). latest() is collective too when a process
  group exists: rank 0 repairs, then every rank reads the same directory listing.
"""

import json
import os
import random
import re
import shutil

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

MARKER = "COMPLETE"
STEP_DIR = re.compile(r"step_(\d+)")
TMP_PREFIX = ".tmp-"
REPLACED_DIR = re.compile(r"\.tmp-(step_\d+)-replaced")  # a complete checkpoint renamed aside while replaced


def save(ckpt_root: str, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, extra: dict,
         keep_last: int = 2) -> str:
    """Write ckpt_root/step_{step:06d} (trainable weights, optimizer, every rank's RNG, rank 0's extra: JSON, the
    same on every rank); return its path."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 so a complete checkpoint always exists, got {keep_last}")
    rng = _rng_state()  # first, so nothing below can advance the generators before they are recorded
    rank = dist.get_rank()
    name = f"step_{step:06d}"
    final, tmp = os.path.join(ckpt_root, name), os.path.join(ckpt_root, TMP_PREFIX + name)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash during an earlier save of this step
        os.makedirs(tmp)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)  # fsyncs its files
    with open(os.path.join(tmp, f"rank{rank}.pt"), "wb") as f:
        torch.save({"rng": rng}, f)
        _sync(f)
    dist.barrier()  # every rank's files are on disk
    if rank == 0:
        with open(os.path.join(tmp, MARKER), "w") as f:
            json.dump({"step": step, "world_size": dist.get_world_size(), "extra": extra}, f)
            _sync(f)
        replaced = tmp + "-replaced"
        if os.path.exists(final):  # same step saved twice: swap, so there is no moment without a complete copy
            os.rename(final, replaced)
        os.rename(tmp, final)
        _sync_dir(ckpt_root)
        shutil.rmtree(replaced, ignore_errors=True)
        for old in _complete(ckpt_root)[:-keep_last]:
            os.remove(os.path.join(old, MARKER))  # incomplete from here on, in case we are killed mid-deletion
            shutil.rmtree(old)
    dist.barrier()
    return final


def latest(ckpt_root: str) -> str | None:
    """The newest complete checkpoint under ckpt_root, or None. Rank 0 first cleans up after an interrupted save:
    puts back a checkpoint that was renamed aside to be replaced, and deletes incomplete ones."""
    if not os.path.isdir(ckpt_root):
        return None
    if not dist.is_initialized() or dist.get_rank() == 0:
        for name in sorted(os.listdir(ckpt_root)):
            path = os.path.join(ckpt_root, name)
            if (m := REPLACED_DIR.fullmatch(name)) and not os.path.exists(os.path.join(ckpt_root, m[1], MARKER)):
                print(f"restoring {path} to {m[1]} (the save that was replacing it was interrupted)")
                shutil.rmtree(os.path.join(ckpt_root, m[1]), ignore_errors=True)
                os.rename(path, os.path.join(ckpt_root, m[1]))
        complete = _complete(ckpt_root)
        for name in sorted(os.listdir(ckpt_root)):
            path = os.path.join(ckpt_root, name)
            if (name.startswith(TMP_PREFIX + "step_") or STEP_DIR.fullmatch(name)) and path not in complete:
                print(f"removing incomplete checkpoint {path} (an interrupted save)")
                shutil.rmtree(path)
    if dist.is_initialized():
        dist.barrier()  # the other ranks list the directory only after rank 0 has repaired it
    complete = _complete(ckpt_root)
    return complete[-1] if complete else None


def load(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[dict, bool]:
    """Restore trainable weights, optimizer state (unless optimizer is None: evaluation) and, if the checkpoint was
    saved by as many ranks as there are now, every rank's RNG states from `path`, on any number of ranks ->
    (the extra save() was given, whether the RNG states were restored)."""
    if not os.path.exists(os.path.join(path, MARKER)):
        raise ValueError(f"not a complete checkpoint: {path} has no {MARKER} marker; resume from checkpoint.latest()")
    with open(os.path.join(path, MARKER)) as f:
        marker = json.load(f)
    options = StateDictOptions(ignore_frozen_params=True)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options) if optimizer is not None else \
        (get_model_state_dict(model, options=options), None)
    saved = {k[len("model."):] for k in dcp.FileSystemReader(path).read_metadata().state_dict_metadata
             if k.startswith("model.")}
    if saved != set(model_sd):
        frozen_here, trainable_here = sorted(saved - set(model_sd)), sorted(set(model_sd) - saved)
        raise ValueError(f"{path} holds other trainable weights than this model has (saved but frozen here: "
                         f"{frozen_here[:3]}; trainable here but not saved: {trainable_here[:3]}); "
                         f"resume with the freeze settings of the run that saved it")
    state = {"model": model_sd} if optimizer is None else {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)  # reshards to this run's ranks
    # strict=False only because the frozen parameters are absent on purpose; the key check above covers the rest
    options = StateDictOptions(ignore_frozen_params=True, strict=False)
    if optimizer is None:
        set_model_state_dict(model, model_sd, options=options)
    else:
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd, options=options)
    same_world = marker["world_size"] == dist.get_world_size()
    if same_world:  # our own file, written by save(): pickle is needed for python/numpy RNG states
        _set_rng_state(torch.load(os.path.join(path, f"rank{dist.get_rank()}.pt"), weights_only=False)["rng"])
    return marker.get("extra", {}), same_world


def gather(model: torch.nn.Module, names) -> dict:
    """The named parameters as full (unsharded) CPU tensors on rank 0 ({} elsewhere), gathered one at a time.
    Collective: every rank gathers each parameter in the same order."""
    params, full = dict(model.named_parameters()), {}
    for name in dict.fromkeys(names):
        p = params[name]
        tensor = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach()
        if dist.get_rank() == 0:
            full[name] = tensor.cpu().contiguous()
    return full


def write_safetensors(tensors: dict, path: str) -> None:
    """Rank 0 writes tensors to a .safetensors file, atomically (a temporary file renamed into place)."""
    if dist.get_rank() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        save_file(tensors, path + ".tmp", metadata={"format": "pt"})
        os.replace(path + ".tmp", path)
    dist.barrier()


def _complete(ckpt_root: str) -> list[str]:
    """Paths of the complete checkpoints under ckpt_root, oldest first."""
    steps = [(int(m[1]), name) for name in os.listdir(ckpt_root) if (m := STEP_DIR.fullmatch(name))
             and os.path.exists(os.path.join(ckpt_root, name, MARKER))]
    return [os.path.join(ckpt_root, name) for _, name in sorted(steps)]


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    if rng["cuda"] is not None:
        torch.cuda.set_rng_state_all(rng["cuda"])


def _sync(f) -> None:
    f.flush()
    os.fsync(f.fileno())


def _sync_dir(path: str) -> None:
    """Make a rename inside `path` durable: the directory entry itself must reach the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
