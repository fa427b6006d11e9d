"""How a model runs on many devices: the process group, `parallelize`, and building a sharded model.

`parallelize` follows torchtitan's order: activation checkpointing, then per-block compile, then `fully_shard`
per vision block and per LM block, then the root. Each block is its own FSDP unit, so its parameters are
gathered just before it runs and freed after; the root unit holds the rest (embeddings, patch embedding,
projector, final norm, head). Nothing is ever materialised whole: the model is built on the meta device,
sharded, allocated shard by shard (`to_empty`), and each rank reads only its rows of each checkpoint tensor
(`model.load_weights`). Gradients are summed across ranks, not averaged (divide factor 1): the trainer
normalises the loss by the global count of supervised tokens itself.
"""

import os

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from nanovlm.lora import add_adapters, init_adapters
from nanovlm.model import VLM, VLMConfig, load_weights


def uses_cuda(device_name):
    return device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())


def setup_distributed(device_name):
    """Always a process group (gloo on CPU, nccl on CUDA), also for one process, so the code path is one."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 20000))
    cuda = uses_cuda(device_name)
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    return torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")


def parallelize(model: VLM, mesh, param_dtype=torch.float32, activation_checkpointing=False, compile=False):
    """Shard a model (on the meta device, or materialised) over a 1-D device mesh, in place; returns it.
    param_dtype other than fp32: bf16 mixed precision, parameters cast for compute, fp32 master weights and
    gradient reductions."""
    # 1. activation checkpointing: the towers run each block under torch.utils.checkpoint, around its FSDP unit,
    #    so the recomputation in backward gathers the block's parameters again as its forward did
    model.lm.grad_checkpointing = model.vision.grad_checkpointing = activation_checkpointing
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) \
        if param_dtype != torch.float32 else MixedPrecisionPolicy()
    for block in [*model.vision.layers, *model.lm.layers]:
        if compile:  # 2. per block: one graph reused by every layer of the tower
            block.compile()
        fully_shard(block, mesh=mesh, mp_policy=mp)  # 3. per block
    fully_shard(model, mesh=mesh, mp_policy=mp)  # 4. the root
    # the loss is divided by the global supervised-token count, so gradients are summed over ranks; every unit
    # reduces its own gradients and needs telling
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            if mesh.device_type == "cpu":
                module.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM
    return model


def build_sharded(cfg: VLMConfig, device, vision_path, lm_path, seed=0, trained=None, *, trainable=None, lora=None,
                  param_dtype=torch.float32, activation_checkpointing=False, compile=False):
    """The FSDP-sharded model over all ranks of the process group, its weights loaded: built on the meta device,
    frozen where `trainable` ({"vision": bool, "projector": bool, "lm": bool}) says so, LoRA adapters added where
    `lora` ({"targets", "rank", "alpha", "dropout"}) says, parallelized, allocated shard by shard, then each rank
    reads its rows of the towers (and of what the stage starts from)."""
    with torch.device("meta"):
        model = VLM(cfg)
    for part, trains in (trainable or {}).items():
        getattr(model, part).requires_grad_(trains)
    if lora:
        add_adapters(model, lora["targets"], lora["rank"], lora["alpha"], lora["dropout"])
    mesh = dist.device_mesh.init_device_mesh(device.type, (dist.get_world_size(),))
    parallelize(model, mesh, param_dtype, activation_checkpointing, compile)
    model.to_empty(device=device)
    load_weights(model, vision_path, lm_path, seed, trained)
    if lora:
        init_adapters(model, seed)
    return model
