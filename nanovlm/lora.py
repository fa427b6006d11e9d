"""LoRA: low-rank adapters on chosen linear layers, trained in place of the layers' own weights.

    y = x W^T + dropout(x) A^T B^T * alpha / rank        A: (rank, in), B: (out, rank)

What is notable:
- The adapters are two parameters registered on the nn.Linear itself (`lm.layers.3.attn.qkv.lora_A`), and a
  forward hook adds their product: the layer, its weight's name and every key table stay as they are; FSDP shards
  the adapters with their block (they are added before `parallelize`), activation checkpointing recomputes them with
  it, and compile traces the hook.
- Initialised as PEFT does: A Kaiming-uniform (drawn on the CPU from the seed and the layer's name, so every rank
  holds its rows of the same draw), B zero, so step 0 is the base model exactly.
- Our projections are fused (q/k/v in `qkv`, gate/up in `gate_up`): one adapter on `qkv` is PEFT's q, k and v
  adapters sharing one A (B_q, B_k, B_v are B's rows), which is how `peft_state_dict` writes it.
- `merge`: W + B A alpha/rank. A run's final/ holds merged weights, so evaluation, generation, serving and export
  need no LoRA code.
"""

import hashlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanovlm import hf
from nanovlm.lm import LMConfig

# our fused LM projections -> PEFT's (Hugging Face's) names for their rows, in order
LM_PROJECTIONS = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate_up": ("gate_proj", "up_proj"),
                  "down": ("down_proj",)}
TARGETS = tuple(f"lm.{p}" for p in LM_PROJECTIONS) + ("vision.qkv", "vision.o", "vision.fc1", "vision.fc2")


def layers(model, names):
    """{name prefix: nn.Linear} of the blocks' layers that `names` ("lm.qkv", "vision.fc1", ...) select."""
    found = {}
    for part in ("lm", "vision"):
        wanted = {n.split(".", 1)[1] for n in names if n.startswith(part + ".")}
        for name, module in getattr(model, part).layers.named_modules():
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in wanted:
                found[f"{part}.layers.{name}"] = module
    return found


def add_adapters(model, names, rank, alpha, dropout):
    """On the meta device, before `parallelize`: A and B on each selected layer, and the hook that adds them. The
    parts they adapt ("lm", "vision") are frozen but for the adapters, which are all that trains of them."""
    for part in {n.split(".")[0] for n in names}:
        getattr(model, part).requires_grad_(False)
    scale = alpha / rank

    def hook(layer, args, out):
        x = F.dropout(args[0], dropout, training=layer.training) if dropout else args[0]
        h = F.linear(x, layer.lora_A)  # (..., rank)
        # out + h (B scale)^T in one addmm: no full-width product, scaling and sum as three passes over memory
        return torch.addmm(out.flatten(0, -2), h.flatten(0, -2), (layer.lora_B * scale).t()).view_as(out)

    for layer in layers(model, names).values():
        layer.lora_A = nn.Parameter(torch.empty(rank, layer.in_features, device=layer.weight.device))
        layer.lora_B = nn.Parameter(torch.empty(layer.out_features, rank, device=layer.weight.device))
        layer.register_forward_hook(hook)


@torch.no_grad()
def init_adapters(model, seed):
    """A as nn.Linear's own Kaiming-uniform draws it (PEFT's init), B = 0: the adapted model is the base model."""
    for name, layer in model.named_modules():
        if hasattr(layer, "lora_A"):
            digest = hashlib.blake2b(f"{seed} {name}".encode(), digest_size=8).digest()
            generator = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
            bound = 1 / math.sqrt(layer.lora_A.shape[1])
            full = torch.empty(layer.lora_A.shape).uniform_(-bound, bound, generator=generator)
            hf.copy_rows(layer.lora_A, full.shape[0], 0, lambda start, stop: full[start:stop])
            layer.lora_B.zero_()


def merge(weight, lora_A, lora_B, alpha):
    """Full tensors of an adapted layer -> its weight with the adapter merged in: W + B A alpha / rank."""
    return weight + (lora_B @ lora_A) * (alpha / lora_A.shape[0])


def peft_state_dict(adapters, cfg: LMConfig):
    """{our "lm.layers.3.attn.qkv": (A, B)} -> PEFT's adapter tensors for the LM as a Hugging Face causal LM
    (`base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`, ...): a fused adapter becomes PEFT's
    per-projection adapters sharing its A."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    rows = {"qkv": [q, kv, kv], "o": [cfg.dim], "gate_up": [cfg.hidden_dim] * 2, "down": [cfg.dim]}
    out = {}
    for prefix, (A, B) in adapters.items():
        part, _, layer, block, projection = prefix.split(".")  # lm.layers.3.attn.qkv
        if part != "lm":
            continue
        module = "self_attn" if block == "attn" else "mlp"
        for name, B_rows in zip(LM_PROJECTIONS[projection], B.split(rows[projection])):
            key = f"base_model.model.model.layers.{layer}.{module}.{name}"
            out[f"{key}.lora_A.weight"], out[f"{key}.lora_B.weight"] = A.clone(), B_rows.clone()  # A: a copy each
    return out
