"""`python -m nanovlm.check [--device cuda] [--quick]`: the paths a GPU run takes, on the device at hand.

CI never runs on a GPU, so this is the one command to run where one is lent (in under 8 minutes on one GPU): the
varlen attention packed rows take on CUDA (flash-attn 2, or torch.nn.attention.varlen) against causal SDPA run
sample by sample in fp32, outputs and gradients, GQA, with and without a sliding window; then 20 bf16 FSDP steps with
activation checkpointing and compiled blocks of a ~1.1B random Llama (TinyLlama's shape, GQA) and a CLIP-L/14-336-
sized tower at 16 frames pooled 2x2, on packed rows whose lengths change every step; it prints MFU against the
datasheet peak, how many graphs each block compiled to, and peak memory. It needs only torch, transformers and
safetensors: random weights written as Hugging Face checkpoints and loaded through nanovlm's own loader, random
frames, no decoding. `--quick` (tiny sizes) runs the same code on a CPU: tests/test_bench.py does.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from contextlib import nullcontext

import torch
import transformers as tf

from nanovlm import data
from nanovlm.bench import SIZES, make_samples, packed_batch, process_memory, sync
from nanovlm.lifecycle import end_distributed
from nanovlm.metrics import FlopCounter, peak_flops
from nanovlm.model import IGNORE, vlm_config
from nanovlm.parallel import build_sharded, setup_distributed


CHECK = {  # a TinyLlama-1.1B-sized Llama (GQA: 32 heads, 4 KV heads) and a CLIP-L/14-336-sized tower
    "full": dict(lm=dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                         num_key_value_heads=4, vocab_size=32000, max_position_embeddings=8192),
                 vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                             image_size=336, patch_size=14),
                 frames=16, pool_stride=2, max_tokens=4736, rows=2, steps=20, attention=(2, 2048, 32, 4, 64)),
    "quick": dict(lm=SIZES["quick"]["lm"], vision=SIZES["quick"]["vision"], frames=2, pool_stride=2, max_tokens=128,
                  rows=2, steps=6, attention=(2, 64, 4, 2, 16)),
}


def random_checkpoint(path, config, model_class, dtype=torch.bfloat16):
    """A Hugging Face checkpoint of random weights, written tensor by tensor (the model is built on meta only)."""
    from safetensors.torch import save_file
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in model_class(config).state_dict().items()}
    config.architectures = [model_class.__name__]
    config.save_pretrained(path)
    g = torch.Generator().manual_seed(0)
    save_file({k: (torch.randn(s, generator=g) * 0.02).to(dtype) for k, s in shapes.items()},
              os.path.join(path, "model.safetensors"))


def attention_check(device, shape):
    """Packed rows through the attention this device takes (a varlen kernel on CUDA in bf16, else SDPA with a
    mask) against causal SDPA run sample by sample in fp32: outputs and gradients, GQA, with and without a sliding
    window. Errors relative to the reference's largest value."""
    from nanovlm import lm
    B, T, H, KV, hd = shape
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, T, n, hd, generator=g).to(device, dtype).requires_grad_() for n in (H, KV, KV))
    lengths = [torch.randint(1, T // 2, (8,), generator=g).tolist() for _ in range(B)]
    docs = torch.full((B, T), -1, dtype=torch.long)  # documents of random lengths, then padding (-1)
    for row, ls in enumerate(lengths):
        ids = torch.repeat_interleave(torch.arange(len(ls)), torch.tensor(ls))[:T - 3]
        docs[row, :len(ids)] = ids
    docs, real = docs.to(device), (docs >= 0).to(device)
    kernel = lm.varlen_kernel(q)
    result = {"kernel": "flash-attn" if kernel is lm.flash_attn_varlen_func and kernel else
              "torch.nn.attention.varlen" if kernel else "SDPA with a mask"}
    for window in (None, T // 4):
        try:
            out = lm.attention(q, k, v, lm.attention_meta(docs, T, window, kernel is not None), window)
        except RuntimeError as e:  # a kernel without sliding windows (torch 2.10's varlen): say so, check the rest
            result[f"window={window}"] = {"out": float("nan"), "grads": float("nan"), "error": str(e)}
            continue
        grads = torch.autograd.grad(out.float()[real].square().sum(), (q, k, v))
        qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
        ref = torch.zeros(B, T, H, hd, device=device)
        for row in range(B):
            for d in docs[row][real[row]].unique().tolist():
                idx = (docs[row] == d).nonzero().flatten()
                n = len(idx)
                allowed = torch.ones(n, n, dtype=torch.bool, device=device).tril()
                if window is not None:
                    allowed &= torch.arange(n, device=device)[:, None] - torch.arange(n, device=device) < window
                s = [t[row, idx].transpose(0, 1) for t in (qf, kf, vf)]  # (heads, n, hd)
                ref[row, idx] = torch.nn.functional.scaled_dot_product_attention(
                    *s, attn_mask=allowed, enable_gqa=True).transpose(0, 1)
        ref_grads = torch.autograd.grad(ref[real].square().sum(), (qf, kf, vf))
        result[f"window={window}"] = {
            "out": ((out.float() - ref)[real].abs().max() / ref.abs().max()).item(),
            "grads": max(((a.float() - b).abs().max() / b.abs().max()).item() for a, b in zip(grads, ref_grads))}
    return result


def compiles(block_class):
    """How many graphs dynamo holds for a block class's forward: 1 + its recompilations."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list  # private: the one per-function view
    return len(_debug_get_cache_entry_list(block_class.forward.__code__))


def check(device, quick):
    """20 bf16 FSDP steps with activation checkpointing and compiled blocks of the CHECK model on packed rows of
    varying lengths, after the attention check: MFU against the peak, compiles per block, peak memory."""
    from nanovlm import lm, vision
    size = CHECK["quick" if quick else "full"]
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "attention": attention_check(device, size["attention"])}
    print(f"attention ({report['attention']['kernel']}), errors relative to per-sample SDPA in fp32: "
          + "; ".join(f"{k}: out {v['out']:.1e}, grads {v['grads']:.1e}" for k, v in report["attention"].items()
                      if k != "kernel"), flush=True)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with tempfile.TemporaryDirectory() as root:
        vision_path, lm_path = f"{root}/vision", f"{root}/lm"
        random_checkpoint(vision_path, tf.CLIPVisionConfig(**size["vision"]), tf.CLIPVisionModel)
        random_checkpoint(lm_path, tf.LlamaConfig(**size["lm"]), tf.LlamaForCausalLM)
        device = setup_distributed(device.type)
        cfg = vlm_config(vision_path, lm_path, pool_stride=size["pool_stride"])
        start = time.perf_counter()
        model = build_sharded(cfg, device, vision_path, lm_path, param_dtype=dtype, activation_checkpointing=True,
                              compile=True, trainable={"vision": False, "projector": True, "lm": True})
        report["load_s"] = time.perf_counter() - start
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
    flops, (peak, peak_source) = FlopCounter(model, False, True, True), peak_flops(device, dtype)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    steps = []
    for step in range(size["steps"]):
        g = torch.Generator().manual_seed(step)  # every step other prompt and answer lengths: other row shapes
        specs = [(size["frames"], int(torch.randint(8, 33, (), generator=g)), int(torch.randint(8, 65, (), generator=g)))
                 for _ in range(16)]
        samples = make_samples(specs, cfg.tokens_per_frame, cfg.vision.image_size, cfg.lm.vocab_size, seed=step)
        rows = data.plan_rows([len(s["input_ids"]) for s in samples], [size["frames"]] * len(samples),
                              size["max_tokens"], 1 << 20, 0, 0, shuffle=False)[:size["rows"]]
        batch = packed_batch([samples[i] for row in rows for i in row], size["max_tokens"])
        step_flops = flops(batch["document_ids"], int((batch["targets"] != IGNORE).sum()), len(batch["frames"]))
        batch = {k: v.to(device) for k, v in batch.items()}
        sync(device)
        start = time.perf_counter()
        with autocast:
            loss, count = model(**batch)
        (loss / count).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        seconds = time.perf_counter() - start
        steps.append({"loss": loss.item() / count.item(), "s": seconds, "mfu": step_flops / seconds / peak,
                      "shape": list(batch["input_ids"].shape), "frames": len(batch["frames"])})
        print(f"step {step + 1}: {batch['input_ids'].shape[0]} x {batch['input_ids'].shape[1]} tokens, "
              f"{len(batch['frames'])} frames, loss {steps[-1]['loss']:.3f}, {seconds:.2f} s, MFU "
              f"{steps[-1]['mfu']:.1%}", flush=True)
    timed = sorted(steps[len(steps) // 2:], key=lambda s: s["s"])  # the second half: compiled and warm
    report.update(steps=steps, peak_flops=peak, peak_source=peak_source, mfu=timed[len(timed) // 2]["mfu"],
                  compiles={name: compiles(block) for name, block in (("lm block", lm.Block),
                                                                       ("vision block", vision.Block))},
                  peak_memory_gb=(torch.cuda.max_memory_allocated(device) if device.type == "cuda" else
                                  process_memory("VmHWM")) / 1e9)
    print(f"median MFU over the last {len(timed)} steps: {report['mfu']:.1%} of {peak / 1e12:.2f} TFLOP/s "
          f"({peak_source}); compiles per block: {report['compiles']}; peak memory {report['peak_memory_gb']:.1f} GB; "
          f"loading {report['load_s']:.1f} s")
    end_distributed()
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description="the GPU paths (varlen attention, bf16 FSDP, checkpointing, "
                                                 "compile) on the device at hand; prints numbers, writes JSON")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a CPU: the test)")
    parser.add_argument("--out", default="check.json")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    report = check(torch.device("cuda" if cuda else "cpu"), args.quick)
    report["command"] = " ".join(["python -m nanovlm.check", *(argv if argv is not None else sys.argv[1:])])
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
