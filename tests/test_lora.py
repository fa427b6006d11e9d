"""LoRA (nanovlm/lora.py, train.py's lora_* settings): the adapted model at step 0 is the base model, merged equals
adapted, only the adapters (and the stage's parts) train, resume is exact, and final/ needs no LoRA code."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import transformers as tf
from safetensors.torch import load_file

import train
from conftest import run_args
from nanovlm import lora
from nanovlm.generate import load_final
from nanovlm.metrics import FlopCounter
from nanovlm.model import VISUAL_TOKEN, VLM, load_weights, vlm_config
from nanovlm.parallel import build_sharded

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
TARGETS = ["lm.qkv", "lm.o", "lm.gate_up", "lm.down", "vision.qkv", "vision.fc2"]


def adapted_model(synthetic, rank=4, alpha=8.0, targets=TARGETS):
    with torch.device("meta"):
        model = VLM(vlm_config(f"{synthetic}/vision", f"{synthetic}/lm", pool_stride=2))
    if rank:
        lora.add_adapters(model, targets, rank, alpha, 0.0)
    model.to_empty(device="cpu")
    load_weights(model, f"{synthetic}/vision", f"{synthetic}/lm", seed=0)
    if rank:
        lora.init_adapters(model, seed=0)
    return model.eval()


def batch(model):
    n = model.cfg.tokens_per_frame * 2
    ids = torch.tensor([[1, 5] + [VISUAL_TOKEN] * n + [7, 8, 9, 2]])
    return ids, torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_step_zero_is_the_base_model_and_merged_equals_adapted(synthetic):
    base, model = adapted_model(synthetic, rank=0), adapted_model(synthetic)
    ids, frames = batch(model)
    with torch.no_grad():
        assert torch.equal(model(ids, frames), base(ids, frames))  # B = 0: exactly the base model
        layers = lora.layers(model, TARGETS)
        assert len(layers) == 4 * len(model.lm.layers) + 2 * len(model.vision.layers)  # the projections named
        for layer in layers.values():
            layer.lora_B.normal_(0, 0.5)  # a trained adapter
        adapted = model(ids, frames)
        assert (adapted - base(ids, frames)).abs().max() > 1e-2
        for name, layer in layers.items():
            base.get_submodule(name).weight.copy_(lora.merge(layer.weight, layer.lora_A, layer.lora_B, 8.0))
        torch.testing.assert_close(base(ids, frames), adapted, atol=1e-5, rtol=0)


@pytest.fixture
def process_group():
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    yield
    dist.destroy_process_group()


def test_only_the_adapters_and_the_projector_train(synthetic, process_group):
    c = train.settings(run_args(synthetic, "unused", train_vision=False, lora_rank=4, lora_targets=TARGETS[:4]))
    cfg = vlm_config(c.vision_path, c.lm_path)
    model = build_sharded(cfg, torch.device("cpu"), c.vision_path, c.lm_path, trainable={
        "vision": False, "projector": True, "lm": True}, lora=dict(targets=c.lora_targets, rank=4, alpha=16.0,
                                                                 dropout=0.1))
    optimizer = train.make_optimizer(model, c)
    before = {k: v.full_tensor().clone() for k, v in model.state_dict().items()}
    ids, frames = batch(model)
    targets = torch.full_like(ids, -100)
    targets[0, -4:-1] = ids[0, -3:]
    for _ in range(2):  # the second step: B is no longer zero, so A's gradient is not either
        model(ids, frames, targets)[0].backward()
        optimizer.step()
        optimizer.zero_grad()
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trained == {n for n in before if n.startswith("projector.") or n.endswith(("lora_A", "lora_B"))}
    for name, p in model.named_parameters():
        assert (not torch.equal(p.full_tensor(), before[name])) == (name in trained), name


def test_adapter_bytes_are_a_sliver_of_full_finetuning(synthetic):
    """What the optimizer holds: rank-4 adapters on every LM projection of the demo LM, against the LM itself."""
    model = adapted_model(synthetic, targets=TARGETS[:4])
    adapters = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    lm = sum(p.numel() for n, p in model.lm.named_parameters() if "lora_" not in n)
    assert adapters < 0.1 * lm


def test_lora_run_resumes_exactly_and_final_needs_no_lora_code(synthetic, tmp_path):
    args = run_args(synthetic, tmp_path / "run", max_steps=4, ckpt_interval=2, eval_interval=4, train_vision=False,
                    lora_rank=4, lora_alpha=8.0, lora_dropout=0.1, learning_rate=1e-2, lm_learning_rate=1e-2)
    command = [sys.executable, os.path.join(ROOT, "train.py")]
    result = subprocess.run(command + args, capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "run" / "log.jsonl") as f:
        first = [json.loads(line) for line in f]
    # the checkpoint holds the adapters and the projector only, and resumes bit for bit (dropout's RNG included)
    subprocess.run(["rm", "-rf", str(tmp_path / "run" / "ckpt" / "step_000004"), str(tmp_path / "run" / "final")],
                   check=True)
    result = subprocess.run(command + args + ["--resume=True"], capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "run" / "log.jsonl") as f:
        again = [json.loads(line) for line in f][len(first):]
    losses = lambda logged: [(m["step"], m["loss"]) for m in logged if "loss" in m]  # noqa: E731
    assert losses(again) == losses(first)[2:]
    # final/: the adapted weights merged, read back by the plain loader: the model at the end of training
    tensors = load_file(tmp_path / "run" / "final" / "trained.safetensors")
    assert not any("lora" in k for k in tensors) and "lm.layers.0.attn.qkv.weight" in tensors
    model, tokenizer, info = load_final(str(tmp_path / "run" / "final"))
    assert not any("lora" in n for n, _ in model.named_parameters())
    at_end = [m for m in first if "val_loss" in m][-1]
    result = subprocess.run(command + run_args(synthetic, tmp_path / "eval", init_from=tmp_path / "run" / "final",
                                               eval_only=True), capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    evaluated = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert abs(evaluated["val_loss"] - at_end["val_loss"]) <= 1e-6
    # and in PEFT's layout: each adapter, split back into the Hugging Face projections, gives the merged weight
    adapter = tmp_path / "run" / "final" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (4, 8.0, "LORA")
    peft = load_file(adapter / "adapter_model.safetensors")
    hf_lm = tf.AutoModelForCausalLM.from_pretrained(f"{synthetic}/lm")
    modules = dict(hf_lm.named_modules())
    for key in [k for k in peft if k.endswith("lora_A.weight")]:
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        W = modules[module].weight.detach()
        merged_hf = W + peft[key.replace("lora_A", "lora_B")] @ peft[key] * (8.0 / 4)
        ours = merged_weight_rows(tensors, module, model.cfg.lm)
        torch.testing.assert_close(merged_hf, ours, atol=1e-6, rtol=0)


def merged_weight_rows(tensors, module, cfg):
    """Our fused merged weight's rows for one Hugging Face projection (module: model.layers.0.self_attn.k_proj)."""
    _, _, layer, block, name = module.split(".")
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    fused = {"q_proj": ("attn.qkv", 0, q), "k_proj": ("attn.qkv", q, q + kv), "v_proj": ("attn.qkv", q + kv, q + 2 * kv),
             "o_proj": ("attn.o", 0, None), "gate_proj": ("mlp.gate_up", 0, cfg.hidden_dim),
             "up_proj": ("mlp.gate_up", cfg.hidden_dim, None), "down_proj": ("mlp.down", 0, None)}[name]
    return tensors[f"lm.layers.{layer}.{fused[0]}.weight"][fused[1]:fused[2]]


def test_flops_bill_no_weight_gradients_for_an_adapted_lm(synthetic):
    model = adapted_model(synthetic, targets=TARGETS[:4])
    docs = torch.zeros(1, 20, dtype=torch.long)
    full, adapted = FlopCounter(model, False, True, True)(docs, 5, 0), FlopCounter(model, False, True, False)(docs, 5, 0)
    assert adapted < full  # train.py bills a LoRA-adapted LM as frozen (its adapters' FLOPs are negligible)
