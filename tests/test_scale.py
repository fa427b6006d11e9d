"""At scale, by design, checked on CPU (issue 12): every rank issues the same collectives whatever its batch holds;
loading never holds the whole model; scoring memory does not grow with the label set; bf16 mixed precision.

This file is also the ranks' script: `torchrun ... tests/test_scale.py collectives OUT VISION LM` and
`... tests/test_scale.py load OUT VISION LM` (also without torchrun, for one process).
"""

import hashlib
import json
import os
import resource
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import transformers as tf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train  # noqa: E402
from conftest import run_args  # noqa: E402
from nanovlm import data, hf  # noqa: E402
from nanovlm.config import configure  # noqa: E402
from nanovlm.lifecycle import end_distributed  # noqa: E402
from nanovlm.metrics import FlopCounter  # noqa: E402
from nanovlm.model import IGNORE, VISUAL_TOKEN, vlm_config  # noqa: E402
from nanovlm.parallel import build_sharded, setup_distributed  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)


def torchrun(nproc, *args, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", __file__,
           *args] if nproc else [sys.executable, __file__, *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout)


# -----------------------------------------------------------------------------------------------------------------
# Every rank issues the same collectives

def sample(tokens_per_frame, frames, size, seed):
    """A sample as the dataset returns it: prompt, frames x tokens_per_frame visual tokens, a supervised answer."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(3, 200, (12,), generator=g)
    ids = torch.cat([text[:4], torch.full((frames * tokens_per_frame,), VISUAL_TOKEN), text[4:]])
    targets = torch.full_like(ids, IGNORE)
    targets[-9:-1] = ids[-8:]
    return {"input_ids": ids, "targets": targets, "row": 0,
            "frames": torch.randint(0, 256, (frames, 3, size, size), dtype=torch.uint8, generator=g)}


def micro_batches(cfg, step):
    """(rank 0's, rank 1's) micro-batch of a step. Steps 1-2: rank 0 text only, rank 1 video. Steps 3-4: rank 1's
    media all unreadable (the dataset returned None for both samples), rank 0 video."""
    size, tpf = cfg.vision.image_size, cfg.tokens_per_frame
    text = [sample(tpf, 0, size, 10 * step + k) for k in range(2)]
    video = [dict(sample(tpf, 2, size, 10 * step + 5 + k), row=k) for k in range(2)]
    text[1]["row"] = 1
    if step <= 2:
        return data.collate(text, size), data.collate(video, size)
    return data.collate(video, size), data.collate([None, None], size)


def collectives(out, vision, lm):
    """Ranks of a run whose batches differ in what they hold; with one process, both micro-batches in turn."""
    device = setup_distributed("cpu")
    rank, world = dist.get_rank(), dist.get_world_size()
    c = configure(train.DEFAULTS, [f"--vision_path={vision}", f"--lm_path={lm}", "--train_vision=True",
                                         "--train_lm=True", "--compile=False"])
    cfg = vlm_config(vision, lm, pool_stride=2)
    model = build_sharded(cfg, device, vision, lm, seed=0, trainable={"vision": True, "projector": True, "lm": True})
    optimizer = train.make_optimizer(model, c)
    flops = FlopCounter(model, True, True, True)
    losses = []
    for step in range(1, 5):
        pair = micro_batches(cfg, step)
        micro = [pair[rank]] if world == 2 else list(pair)
        losses.append(train.train_step(model, optimizer, micro, c, device, torch.autocast("cpu", enabled=False),
                                       flops)[0])
    if rank == 0:
        with open(os.path.join(out, f"losses-{world}.json"), "w") as f:
            json.dump(losses, f)
    end_distributed()


def test_text_only_and_unreadable_batches_on_one_rank_match_one_rank(synthetic, tmp_path):
    vision, lm = f"{synthetic}/vision", f"{synthetic}/lm"
    for nproc in (2, 0):  # 0: one plain process
        result = torchrun(nproc, "collectives", str(tmp_path), vision, lm, timeout=240)  # a hang fails here
        assert result.returncode == 0, result.stderr[-3000:]
    two, one = (json.loads((tmp_path / f"losses-{w}.json").read_text()) for w in (2, 1))
    assert len(two) == 4 and all(abs(a - b) <= 1e-5 for a, b in zip(two, one)), (two, one)


def test_mixed_text_and_video_run_on_two_ranks(synthetic, tmp_path):
    """The run that crashed with gloo's "Received data size doesn't match" (a hang on NCCL) at step 3: text-only
    records beside videos, one 40-token row per rank, and an evaluation where one rank has no sample."""
    with open(f"{synthetic}/something-something-v2_train.json") as f:
        records = json.load(f)[:24]
    records += [{"id": f"t{k}", "conversations": [{"from": "human", "value": f"Count to {k}."},
                                                  {"from": "gpt", "value": " ".join(map(str, range(k + 1)))}]}
                for k in range(24)]
    (tmp_path / "mixed.json").write_text(json.dumps(records))
    (tmp_path / "one.json").write_text(json.dumps(records[:1]))  # one validation sample: rank 1 has none
    args = run_args(synthetic, tmp_path / "out", train_data=tmp_path / "mixed.json", val_data=tmp_path / "one.json",
                    max_tokens=40, pool_stride=4, batch_size=1, global_batch_size=2, max_steps=10, eval_interval=5,
                    eval_label_set=True)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             os.path.join(ROOT, "train.py"), *args], capture_output=True, text=True, env=ENV,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "out" / "log.jsonl") as f:
        logged = [json.loads(line) for line in f]
    assert [m["step"] for m in logged if "loss" in m] == list(range(1, 11))
    evals = [m for m in logged if "val_samples" in m]
    assert [m["val_samples"] for m in evals] == [1, 1] and all("val_top1" in m for m in evals)
    # eval_only on one process gives the same metrics as the two ranks at step 10
    again = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args, "--eval_only=True",
                            "--resume=True"], capture_output=True, text=True, env=ENV, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    one = json.loads((tmp_path / "out" / "eval.json").read_text())
    for key in ("val_loss", "val_accuracy", "val_top1", "val_top1_shuffled"):
        assert one[key] == pytest.approx(evals[-1][key], abs=1e-6), key


# -----------------------------------------------------------------------------------------------------------------
# Loading: each rank reads its rows; nobody holds the whole model

LLAMA_05B = dict(vocab_size=32000, hidden_size=1280, intermediate_size=3456, num_hidden_layers=26,
                 num_attention_heads=20, num_key_value_heads=4, tie_word_embeddings=False)


def digest(tensor):
    return hashlib.sha1(tensor.detach().float().contiguous().numpy().tobytes()).hexdigest()


def load(out, vision, lm):
    """Build the sharded model; report this process's peak RSS and a digest of every full LM parameter."""
    device = setup_distributed("cpu")
    model = build_sharded(vlm_config(vision, lm), device, vision, lm, seed=0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    digests = {name: digest(p.full_tensor()) for name, p in model.lm.named_parameters()}  # one at a time
    with open(os.path.join(out, f"load-{dist.get_rank()}.json"), "w") as f:
        json.dump({"peak": peak, "digests": digests}, f)
    end_distributed()


def test_sharded_loading_reads_only_each_ranks_rows(synthetic, tmp_path):
    """A random ~0.55B Llama (bf16 on disk, as published checkpoints are) loaded into fp32 on 2 ranks: each rank's
    peak memory is its half plus the libraries, and every parameter is the checkpoint's, tensors fused as the key
    table says."""
    from nanovlm.check import random_checkpoint
    random_checkpoint(tmp_path / "llama", tf.LlamaConfig(**LLAMA_05B), tf.LlamaForCausalLM)
    cfg = hf.lm_config(hf.read_config(tmp_path / "llama"), "")
    full_bytes = 4 * (2 * cfg.vocab_size * cfg.dim + cfg.n_layers * (
        cfg.dim * (2 * cfg.dim + 2 * cfg.n_kv_heads * cfg.head_dim) + 3 * cfg.dim * cfg.hidden_dim + 2 * cfg.dim))
    assert 2.0e9 < full_bytes < 2.4e9
    result = torchrun(2, "load", str(tmp_path), f"{synthetic}/vision", str(tmp_path / "llama"), timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt, expected = hf.CheckpointFiles(str(tmp_path / "llama")), {}
    for hf_key, our_key, row in hf.lm_key_table(cfg, "LlamaForCausalLM"):  # the parts of each fused parameter
        expected.setdefault(our_key, []).append((row, ckpt.read(hf_key, 0, ckpt.shape_and_float(hf_key)[0][0])))
    expected = {k: digest(torch.cat([t for _, t in sorted(parts, key=lambda p: p[0])])) for k, parts in expected.items()}
    for rank in (0, 1):
        loaded = json.loads((tmp_path / f"load-{rank}.json").read_text())
        assert loaded["digests"] == expected
        assert loaded["peak"] <= full_bytes / 2 + 1.5e9, (rank, loaded["peak"] / 1e9)  # its half, plus libraries


# -----------------------------------------------------------------------------------------------------------------
# bf16 mixed precision (FSDP2 MixedPrecisionPolicy: bf16 parameters, fp32 reductions) on gloo

def test_bf16_mixed_precision_on_two_ranks_stays_close_to_fp32(synthetic, tmp_path):
    runs = {}
    for dtype in ("float32", "bfloat16"):
        args = run_args(synthetic, tmp_path / dtype, max_steps=20, dtype=dtype)
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 os.path.join(ROOT, "train.py"), *args], capture_output=True, text=True, env=ENV,
                                timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        with open(tmp_path / dtype / "log.jsonl") as f:
            runs[dtype] = {m["step"]: m["loss"] for m in map(json.loads, f) if "loss" in m}
    assert sorted(runs["bfloat16"]) == list(range(1, 21))
    for step, loss in runs["float32"].items():
        assert abs(runs["bfloat16"][step] - loss) <= 0.02 * loss, (step, loss, runs["bfloat16"][step])
    assert runs["bfloat16"][20] < runs["bfloat16"][1]


if __name__ == "__main__":
    {"collectives": collectives, "load": load}[sys.argv[1]](*sys.argv[2:])
