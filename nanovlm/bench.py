"""`python -m nanovlm.bench`: how fast nanovlm trains, against transformers' LLaVA on the same weights.

The towers are random-init Hugging Face checkpoints written to a temporary directory (a SmolLM2-135M-sized Llama
and a small CLIP; `--quick` for tiny ones), loaded three times, each in a process of its own: by nanovlm with eager
blocks, by nanovlm with compiled blocks (train.py's default), and into `LlavaForConditionalGeneration`, the
projector copied across. Before anything is timed, the three losses on the same batch must agree.

Every figure is the median of `--repeats` steps (forward + backward + AdamW) inside this one run, the contenders
alternated step by step, so all see the same machine load. MFU is model FLOPs (`metrics.FlopCounter`: 6N per
token for the LM blocks, the LM head on supervised tokens only, causal attention per sample, the vision tower per
frame; the same count for all models) over the peak of a dense matmul of the same dtype timed in this run.
Peak memory is the process's peak RSS during one step (Linux `clear_refs`), or CUDA's peak allocation.
"""

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from contextlib import nullcontext
from multiprocessing.connection import wait

import torch
import transformers as tf

from nanovlm import data
from nanovlm.metrics import FlopCounter, peak_flops
from nanovlm.model import IGNORE, VISUAL_TOKEN, VLM, from_pretrained, vlm_config
from nanovlm.lifecycle import end_distributed
from nanovlm.parallel import build_sharded, setup_distributed

SIZES = {  # a SmolLM2-135M-sized LM and a small CLIP (64 px, 8 px patches: 64 visual tokens per frame)
    "full": dict(lm=dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
                         rms_norm_eps=1e-5, max_position_embeddings=8192),
                 vision=dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6,
                             image_size=64, patch_size=8),
                 frames=8, rows=2, max_tokens=1024, memory_frames=(8, 16, 32), clips=32,
                 video=((2, 12), (8, 32), (8, 64))),  # (frames, prompt tokens, answer tokens) ranges
    "quick": dict(lm=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True),
                  vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=32, patch_size=8),
                  frames=2, rows=2, max_tokens=128, memory_frames=(2, 4), video=((1, 3), (2, 8), (2, 8)), clips=8),
}


def make_towers(root, size):
    """Random-init HF checkpoints of both towers under root -> (vision_path, lm_path)."""
    torch.manual_seed(0)
    vision_path, lm_path = os.path.join(root, "vision"), os.path.join(root, "lm")
    tf.CLIPVisionModel(tf.CLIPVisionConfig(**size["vision"])).save_pretrained(vision_path)
    tf.LlamaForCausalLM(tf.LlamaConfig(**size["lm"])).save_pretrained(lm_path)
    return vision_path, lm_path


def make_llava(model, size, vision_path, lm_path):
    """transformers' LLaVA holding nanovlm's weights; image token id = the last vocabulary id (no text uses it)."""
    config = tf.LlavaConfig(vision_config=tf.CLIPVisionConfig(**size["vision"]),
                            text_config=tf.LlamaConfig(**size["lm"]), image_token_id=size["lm"]["vocab_size"] - 1,
                            vision_feature_layer=-2, vision_feature_select_strategy="default",
                            projector_hidden_act="gelu", tie_word_embeddings=True)
    config._attn_implementation = "sdpa"
    llava = tf.LlavaForConditionalGeneration(config)
    llava.model.vision_tower.load_state_dict(tf.CLIPVisionModel.from_pretrained(vision_path).state_dict())
    lm = tf.LlamaForCausalLM.from_pretrained(lm_path)
    llava.model.language_model.load_state_dict(lm.model.state_dict())
    assert llava.lm_head.weight is llava.model.language_model.embed_tokens.weight, "LLaVA's head must be tied"
    proj = llava.model.multi_modal_projector
    with torch.no_grad():
        for ours, theirs in ((model.projector[0], proj.linear_1), (model.projector[2], proj.linear_2)):
            theirs.weight.copy_(ours.weight)
            theirs.bias.copy_(ours.bias)
    return llava


# ----------------------------------------------------------------------------------------------------------------
# Batches: a sample is a prompt, its video's visual tokens, and a supervised answer

def make_samples(specs, tokens_per_frame, image_size, vocab_size, seed=0):
    """specs: [(frames, prompt_tokens, answer_tokens)] -> samples as the dataset returns them."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for frames, prompt, answer in specs:
        text = torch.randint(0, vocab_size - 1, (prompt + answer,), generator=g)
        ids = torch.cat([text[:prompt], torch.full((frames * tokens_per_frame,), VISUAL_TOKEN), text[prompt:]])
        targets = torch.full_like(ids, IGNORE)
        targets[-answer - 1:-1] = ids[-answer:]  # position t predicts token t + 1
        samples.append({"input_ids": ids, "targets": targets,
                        "frames": torch.randn(frames, 3, image_size, image_size, generator=g)})
    return samples


def packed_batch(samples, max_tokens):
    """nanovlm's batch: samples packed into rows of max_tokens (data.plan_rows, in order), document-masked."""
    lengths, frames = [len(s["input_ids"]) for s in samples], [len(s["frames"]) for s in samples]
    rows = data.plan_rows(lengths, frames, max_tokens, sum(frames), 0, 0, shuffle=False)
    batch = data.collate([dict(samples[i], row=r) for r, row in enumerate(rows) for i in row],
                         samples[0]["frames"].shape[-1], pad_to_multiple=1)
    batch.pop("num_skipped"), batch.pop("num_samples")
    return batch


def padded_batch(samples, image_token):
    """transformers' batch: one sample per row, right-padded to the longest; labels unshifted (it shifts)."""
    T = max(len(s["input_ids"]) for s in samples)
    input_ids = torch.zeros(len(samples), T, dtype=torch.long)
    labels = torch.full_like(input_ids, IGNORE)
    attention_mask = torch.zeros_like(input_ids)
    for row, s in enumerate(samples):
        n = len(s["input_ids"])
        input_ids[row, :n] = s["input_ids"].masked_fill(s["input_ids"] == VISUAL_TOKEN, image_token)
        labels[row, 1:n] = s["targets"][:n - 1]
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
            "pixel_values": torch.cat([s["frames"] for s in samples])}


def loss_of(model, batch):
    if "labels" in batch:
        return model(**batch).loss
    loss, count = model(**batch)
    return loss / count


def batch_specs(size, kind, seed=0):
    """(frames, prompt, answer) per sample. "fixed": every row one sample of exactly max_tokens tokens. "video":
    random lengths, as many samples as packing fits into the rows; transformers pads the same samples instead."""
    tpf = (size["vision"]["image_size"] // size["vision"]["patch_size"]) ** 2
    if kind == "fixed":
        return [(size["frames"], 16, size["max_tokens"] - 16 - size["frames"] * tpf)] * size["rows"]
    g = torch.Generator().manual_seed(seed)
    specs = [tuple(int(torch.randint(lo, hi + 1, (), generator=g)) for lo, hi in size["video"]) for _ in range(64)]
    lengths = [f * tpf + p + a for f, p, a in specs]
    rows = data.plan_rows(lengths, [f for f, _, _ in specs], size["max_tokens"], 1 << 20, 0, 0, shuffle=False)
    return [specs[i] for row in rows[:size["rows"]] for i in row]


# ----------------------------------------------------------------------------------------------------------------
# Measurements

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_step(model, optimizer, batch, autocast):
    with autocast:
        loss = loss_of(model, batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def median_seconds(steps, repeats, device):
    """steps: {name: () -> None} -> {name: median seconds}; one warm-up call each, then alternated call by call."""
    times = {name: [] for name in steps}
    for i in range(repeats + 1):
        for name, step in steps.items():
            sync(device)
            start = time.perf_counter()
            step()
            sync(device)
            if i > 0:
                times[name].append(time.perf_counter() - start)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def peak_memory(fn, device):
    """(peak bytes held during fn(), bytes held just before it): CUDA's allocator, or the process's RSS (its peak
    reset through clear_refs after returning freed heap to the OS, so earlier steps do not count)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        return torch.cuda.max_memory_allocated(device), before
    import ctypes
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before = process_memory("VmRSS")
    fn()
    return process_memory("VmHWM"), before


def process_memory(key):
    """Bytes of a /proc/self/status entry: VmRSS (now) or VmHWM (the peak)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def rank_worker(rank, world_size, port, paths, size, repeats, threads, results):
    """One FSDP rank, sharded by nanovlm.parallel as train.py shards it; the fixed batch's rows split over the
    ranks, the loss normalised by the global supervised count, as train.py does."""
    from torch.distributed.tensor import DTensor

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    device = setup_distributed("cpu")
    model = build_sharded(vlm_config(*paths), device, *paths)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    samples = make_batches(model.cfg, size, ("fixed",))["fixed"]
    count = sum(int((s["targets"] != IGNORE).sum()) for s in samples)
    per_rank = len(samples) // world_size
    batch = packed_batch(samples[rank * per_rank:(rank + 1) * per_rank], size["max_tokens"])

    def step():
        loss, _ = model(**batch)
        (loss / count).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.distributed.barrier()

    seconds = median_seconds({"step": step}, repeats, device)["step"]
    held = [*model.parameters(), *(t for state in optimizer.state.values() for t in state.values() if t.ndim)]
    held = [t.to_local() if isinstance(t, DTensor) else t for t in held]  # this rank's shard
    results.put((rank, seconds, sum(t.numel() * t.element_size() for t in held)))
    end_distributed()


def ranks(paths, size, repeats, world_size):
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.get_context("spawn").SimpleQueue()
    threads = max(1, torch.get_num_threads() // world_size)  # the same cores, split between the ranks
    mp.spawn(rank_worker, (world_size, port, paths, size, repeats, threads, results), nprocs=world_size)
    measured = sorted(results.get() for _ in range(world_size))
    tokens = size["rows"] * size["max_tokens"]
    return {"ranks": world_size, "threads_per_rank": threads, "step_s": measured[0][1],
            "tokens_per_s": tokens / measured[0][1], "param_optimizer_bytes_per_rank": max(m[2] for m in measured)}


def write_clips(root, count, seed=0):
    """SSv2-sized clips (427x240 VP9 .webm, 12 fps, 2-4 s: a drifting gradient and a moving square), a LLaVA JSON
    listing them, a word-level tokenizer and a 224 px CLIP config: what VLMDataset needs, made here."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from torchcodec.encoders import VideoEncoder
    os.makedirs(f"{root}/clips", exist_ok=True)
    g, records = torch.Generator().manual_seed(seed), []
    y, x = torch.arange(240)[:, None], torch.arange(427)[None]
    for i in range(count):
        T = int(torch.randint(24, 49, (), generator=g))
        frames = torch.empty(T, 3, 240, 427, dtype=torch.uint8)
        for t in range(T):
            frames[t, 0], frames[t, 1], frames[t, 2] = (x + 3 * t + i) % 256, (2 * y + t) % 256, 128
            frames[t, :, 100:140, 8 * t % 380:8 * t % 380 + 40] = 255
        VideoEncoder(frames, frame_rate=12).to_file(f"{root}/clips/{i}.webm", codec="libvpx-vp9", crf=40)
        records.append({"id": str(i), "video": f"{i}.webm", "conversations": [
            {"from": "human", "value": "<video>\ndescribe"}, {"from": "gpt", "value": "moving square"}]})
    with open(f"{root}/clips.json", "w") as f:
        json.dump(records, f)
    words = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "describe", "moving", "square"])}
    tokenizer = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tf.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                               unk_token="<unk>").save_pretrained(f"{root}/tokenizer")
    tf.CLIPVisionConfig(image_size=224, patch_size=14).save_pretrained(f"{root}/vision")


def data_pipeline(root, frames, workers, epochs, count=32):
    """Loader clips/s against raw torchcodec decoding of the same frames (`python -m nanovlm.data --bench`): uint8
    frames resized to 224 px from SSv2-sized clips."""
    write_clips(root, count)
    dataset = data.VLMDataset(f"{root}/clips.json", f"{root}/clips", data.load_tokenizer(f"{root}/tokenizer"),
                              f"{root}/vision", "plain", frames, tokens_per_frame=1, max_tokens=1 << 20)
    full, raw = data.loader_speed(dataset, 4, workers, epochs)
    return {"clips": len(dataset), "frames": frames, "size": dataset.preprocess.size, "workers": workers,
            "full_clips_per_s": full, "raw_clips_per_s": raw, "full_over_raw": full / raw}


MODELS = ("nanovlm", "nanovlm compiled", "transformers")  # compiled: each block, as train.py does by default


def keep_freed_memory(device):
    """glibc: no mmap'd chunks, no trimming, so that a step never pays for faulting in fresh pages (see contender)."""
    if device.type == "cpu":
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)  # M_MMAP_MAX
        libc.mallopt(-1, 2 ** 31 - 1)  # M_TRIM_THRESHOLD


def contender(name, paths, size, threads, device, conn):
    """One model in a process of its own, as a training run has it, answering the parent's requests: the loss of
    a batch, or the step times of `repeats` timed steps after a warm-up. Each keeps the memory it frees (glibc: no
    mmap'd chunks, no trimming), so that no step pays for faulting in fresh pages: on a VM that hands freed pages
    back to the host that cost is large and depends on what else the machine holds (transformers' bf16 step:
    4.2 s, 6.0 s with an idle 8 GB process beside it)."""
    keep_freed_memory(device)
    torch.set_num_threads(threads)
    model = from_pretrained(*paths, device=device)
    if name == "transformers":
        model = make_llava(model, size, *paths).to(device)
    elif name == "nanovlm compiled":
        for block in [*model.vision.layers, *model.lm.layers]:
            block.compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    batches = {}
    for kind, samples in make_batches(vlm_config(*paths), size).items():
        batch = padded_batch(samples, size["lm"]["vocab_size"] - 1) if name == "transformers" else \
            packed_batch(samples, size["max_tokens"])
        batches[kind] = {k: v.to(device) for k, v in batch.items()}
    conn.send("ready")
    while (request := conn.recv()) is not None:
        what, kind, dtype, repeats = request
        if what == "loss":
            with torch.no_grad():
                conn.send(loss_of(model, batches[kind]).item())
            continue
        dtype = getattr(torch, dtype)
        autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
        conn.send(median_seconds({name: lambda: train_step(model, optimizer, batches[kind], autocast)}, repeats,
                                 device)[name])


def make_batches(cfg, size, kinds=("fixed", "video")):
    """{kind: samples}: the same in every process (seeded)."""
    return {kind: make_samples(batch_specs(size, kind), cfg.tokens_per_frame, cfg.vision.image_size,
                               cfg.lm.vocab_size) for kind in kinds}


def answer(name, conn, proc):
    """A contender's next message, or, if it dies first, the end of the benchmark at once with one line naming it
    (a dead child's pipe would otherwise be waited on forever)."""
    if conn in wait([conn, proc.sentinel]):
        try:
            return conn.recv()
        except EOFError:
            pass
    proc.join()
    why = " (SIGKILL: out of memory?)" if proc.exitcode == -9 else ""
    raise SystemExit(f"bench: the {name!r} contender died with exit code {proc.exitcode}{why}; see its stderr")


def run_contender(name, paths, size, requests, device):
    """One contender's process, alone on the machine: its answers to the requests, in order."""
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=contender, args=(name, paths, size, torch.get_num_threads(), device, child))
    proc.start()
    try:
        assert answer(name, conn, proc) == "ready"
        answers = []
        for request in requests:
            conn.send(request)
            answers.append(answer(name, conn, proc))
        conn.send(None)
        return answers
    finally:
        proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()


def throughput(paths, size, dtypes, repeats, device):
    """Every model, one process at a time (so at most one holds memory), on both batch kinds in each dtype: step
    time, tokens/s (padding excluded), MFU. "transformers" takes the padded batch, the others the packed one.
    Before anything is timed, the losses of the three on the same batches must agree."""
    cfg = vlm_config(*paths)
    with torch.device("meta"):
        flops = FlopCounter(VLM(cfg), True, True, True)
    kinds = make_batches(cfg, size)
    requests = [("loss", kind, None, 0) for kind in kinds]
    requests += [("time", kind, str(dtype).removeprefix("torch."), repeats) for kind in kinds for dtype in dtypes]
    answers = {}
    for name in MODELS:
        answers[name] = dict(zip(requests, run_contender(name, paths, size, requests, device)))
        print(f"{name}: " + ", ".join(f"{r[1]} {r[2]} {s:.2f} s/step" for r, s in answers[name].items()
                                      if r[0] == "time"), flush=True)
    losses = {kind: {name: answers[name][("loss", kind, None, 0)] for name in MODELS} for kind in kinds}
    for kind, by_model in losses.items():
        if max(by_model.values()) - min(by_model.values()) > 1e-4:
            raise SystemExit(f"bench: {kind} batch loss differs: {by_model}; the models are not the same")
    rows = []
    for kind, samples in kinds.items():
        ours = packed_batch(samples, size["max_tokens"])
        supervised, tokens = int((ours["targets"] != IGNORE).sum()), int((ours["document_ids"] >= 0).sum())
        step_flops = flops(ours["document_ids"], supervised, len(ours["frames"]))
        for dtype in dtypes:
            peak, peak_source = peak_flops(device, dtype)
            dt = str(dtype).removeprefix("torch.")
            for name in MODELS:
                s = answers[name][("time", kind, dt, repeats)]
                shape = [len(samples), max(len(x["input_ids"]) for x in samples)] if name == "transformers" else \
                    list(ours["input_ids"].shape)
                rows.append({"batch": kind, "dtype": dt, "model": name, "samples": len(samples), "shape": shape,
                             "step_s": s, "tokens_per_s": tokens / s, "supervised_tokens_per_s": supervised / s,
                             "samples_per_s": len(samples) / s, "mfu": step_flops / s / peak, "peak_flops": peak,
                             "peak_source": peak_source})
    return rows, losses


def checkpointing(model, size, dtype, repeats, device):
    """Peak memory with activation checkpointing off and on at each frame count (one sample of that many frames
    per row), also counted above what the process held before the step; the step time both ways at the middle
    frame count."""
    cfg = model.cfg
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()

    def step(batch, on):
        model.lm.grad_checkpointing = model.vision.grad_checkpointing = on
        train_step(model, optimizer, batch, autocast)

    result = {"dtype": str(dtype).removeprefix("torch."), "peak_bytes": {}}
    for frames in size["memory_frames"]:
        samples = make_samples([(frames, 16, 48)] * size["rows"], cfg.tokens_per_frame, cfg.vision.image_size,
                               cfg.lm.vocab_size)
        batch = {k: v.to(device) for k, v in packed_batch(samples, len(samples[0]["input_ids"])).items()}
        step(batch, False)  # the optimizer state exists before the first measurement
        (off, held), (on, _) = (peak_memory(lambda: step(batch, flag), device) for flag in (False, True))
        # held: what no checkpointing can touch (weights, AdamW state, libraries); the step adds activations + grads
        result["peak_bytes"][frames] = {"off": off, "on": on, "saved": 1 - on / off, "held_before": held,
                                        "step_saved": 1 - (on - held) / (off - held)}
        if frames == size["memory_frames"][len(size["memory_frames"]) // 2]:
            seconds = median_seconds({flag: lambda f=flag: step(batch, f) for flag in ("off", "on")}, repeats, device)
            result.update(frames_timed=frames, step_s=seconds, time_cost=seconds["on"] / seconds["off"] - 1)
    model.lm.grad_checkpointing = model.vision.grad_checkpointing = False
    return result


def lora_vs_full(paths, size, dtype, repeats, device, rank=16):
    """Finetuning the LM in full against LoRA adapters of `rank` on all its projections (the projector trained in
    both, the tower frozen), on the fixed batch: gradient + AdamW state bytes, everything held (all weights too),
    step time (medians, the two alternated). The process keeps the memory it frees from here on, as each contender
    does: alternated without it, LoRA's step re-faulted what full finetuning's had freed (ratio 1.02x against 0.81x
    with it, on the same code)."""
    from nanovlm import lora
    keep_freed_memory(device)
    from nanovlm.model import load_weights
    runs = {}
    for name in ("full", "lora"):
        with torch.device("meta"):
            model = VLM(vlm_config(*paths))
        model.vision.requires_grad_(False)
        if name == "lora":
            lora.add_adapters(model, [f"lm.{p}" for p in lora.LM_PROJECTIONS], rank, 2.0 * rank, 0.0)
        model.to_empty(device=device)
        load_weights(model, *paths)
        if name == "lora":
            lora.init_adapters(model, 0)
        params = [p for p in model.parameters() if p.requires_grad]
        runs[name] = (model, torch.optim.AdamW(params, lr=1e-5, fused=True), params)
    batch = {k: v.to(device) for k, v in packed_batch(make_batches(runs["full"][0].cfg, size, ("fixed",))["fixed"],
                                                      size["max_tokens"]).items()}
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()

    def step(name):
        model, optimizer, _ = runs[name]
        with autocast:
            loss, count = model(**batch)
        (loss / count).backward()
        optimizer.step()  # the gradients stay until the next step's zero_grad: they are counted below
        sync(device)

    seconds = median_seconds({name: (lambda n=name: (runs[n][1].zero_grad(), step(n))) for name in runs}, repeats,
                             device)
    result = {"rank": rank, "dtype": str(dtype).removeprefix("torch."), "step_s": seconds}
    for name, (model, optimizer, params) in runs.items():
        state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if t.ndim)
        grads = sum(p.grad.numel() * p.grad.element_size() for p in params)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        result[name] = {"trained_params": sum(p.numel() for p in params), "grad_optimizer_bytes": grads + state,
                        "held_bytes": weights + grads + state}
    result["grad_optimizer_ratio"] = result["lora"]["grad_optimizer_bytes"] / result["full"]["grad_optimizer_bytes"]
    result["held_ratio"] = result["lora"]["held_bytes"] / result["full"]["held_bytes"]
    result["step_ratio"] = seconds["lora"] / seconds["full"]
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description="nanovlm training speed vs transformers' LLaVA; prints a table, "
                                                 "writes JSON (the GPU paths: python -m nanovlm.check)")
    parser.add_argument("--quick", action="store_true", help="tiny towers and batches (seconds; the tests use it)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per figure (their median)")
    parser.add_argument("--dtypes", default="bfloat16", help="comma-separated, float32,bfloat16 for both (fp32 steps "
                        "take 2x as long here: both did not fit in 15 minutes on 2 EPYC cores)")
    parser.add_argument("--out", default="bench.json", help="where the JSON goes")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    command = " ".join(["python -m nanovlm.bench", *(argv if argv is not None else sys.argv[1:])])
    report = {"command": command, **measure(args, device)}
    print_table(report)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.out}")
    return report


def measure(args, device):
    size = SIZES["quick" if args.quick else "full"]
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    report = {"machine": {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
                          "transformers": tf.__version__,
                          "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None}, "size": size}
    seconds = report["seconds"] = {}
    start = time.perf_counter()

    def done(section):  # the wall-clock of each section, so a slow one shows in the report
        seconds[section] = round(time.perf_counter() - start - sum(seconds.values()), 1)

    with tempfile.TemporaryDirectory() as root:
        paths = make_towers(root, size)
        report["throughput"], report["loss_check"] = throughput(paths, size, dtypes, args.repeats, device)
        done("throughput")
        model = from_pretrained(*paths, device=device)
        report["checkpointing"] = checkpointing(model, size, dtypes[-1], args.repeats, device)
        del model
        done("checkpointing")
        report["lora"] = lora_vs_full(paths, size, dtypes[-1], args.repeats, device)
        done("lora")
        if device.type == "cpu":  # gloo ranks on the same cores; one timed step: the figure is memory per rank
            report["ranks"] = [ranks(paths, size, 1, world_size) for world_size in (1, 2)]
            done("ranks")
        report["data"] = data_pipeline(os.path.join(root, "data"), size["frames"], 2, args.repeats, size["clips"])
        done("data")
    return report


def print_table(report):
    print(f"{report['machine']['cpu']}, {report['machine']['threads']} threads, torch {report['machine']['torch']}")
    print("| batch | dtype | model | rows x tokens | samples/s | tokens/s | supervised/s | MFU | vs transformers |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    rows = report["throughput"]
    for r in rows:
        other = next(o for o in rows if (o["batch"], o["dtype"], o["model"]) == (r["batch"], r["dtype"],
                                                                                 "transformers"))
        print(f"| {r['batch']} | {r['dtype']} | {r['model']} | {r['shape'][0]} x {r['shape'][1]} | "
              f"{r['samples_per_s']:.2f} | {r['tokens_per_s']:,.0f} | {r['supervised_tokens_per_s']:,.0f} | "
              f"{r['mfu']:.1%} | {r['tokens_per_s'] / other['tokens_per_s']:.2f}x |")
    ck = report["checkpointing"]
    for frames, m in ck["peak_bytes"].items():
        print(f"activation checkpointing, {frames} frames ({ck['dtype']}): peak {m['off'] / 1e9:.2f} GB -> "
              f"{m['on'] / 1e9:.2f} GB ({m['saved']:.0%} less); above the {m['held_before'] / 1e9:.2f} GB held "
              f"before the step: {(m['off'] - m['held_before']) / 1e9:.2f} -> {(m['on'] - m['held_before']) / 1e9:.2f}"
              f" GB ({m['step_saved']:.0%} less)")
    print(f"  step time at {ck['frames_timed']} frames: {ck['step_s']['off']:.2f} s -> {ck['step_s']['on']:.2f} s "
          f"({ck['time_cost']:+.0%})")
    lo = report["lora"]
    print(f"LoRA rank {lo['rank']} on every LM projection vs the LM in full ({lo['dtype']}): gradient + AdamW "
          f"state {lo['lora']['grad_optimizer_bytes'] / 1e6:.1f} vs {lo['full']['grad_optimizer_bytes'] / 1e6:.1f} MB "
          f"({lo['grad_optimizer_ratio']:.1%}); all held {lo['held_ratio']:.1%}; step "
          f"{lo['step_s']['lora']:.2f} vs {lo['step_s']['full']:.2f} s ({lo['step_ratio']:.2f}x)")
    for r in report.get("ranks", []):
        print(f"{r['ranks']} rank(s) x {r['threads_per_rank']} threads: {r['tokens_per_s']:,.0f} tokens/s, "
              f"parameters + optimizer {r['param_optimizer_bytes_per_rank'] / 1e9:.3f} GB per rank")
    d = report["data"]
    print(f"data: {d['full_clips_per_s']:.1f} clips/s full pipeline vs {d['raw_clips_per_s']:.1f} raw decoding "
          f"({d['full_over_raw']:.2f}x), {d['frames']} frames, {d['workers']} workers")
    print("seconds per section: " + ", ".join(f"{k} {v:.0f}" for k, v in report["seconds"].items()))


if __name__ == "__main__":
    main()
