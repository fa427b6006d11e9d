"""Train a video VLM: `torchrun --nproc_per_node=N train.py config/X.py --key=value ...` (or `python train.py ...`).

The defaults below are the documentation. Order of work: the config is checked (unknown keys, types, paths,
batch arithmetic) before anything is written or loaded; the model is built on the meta device, sharded with FSDP2
(`fully_shard` per block, then the root), and its weights are loaded once on rank 0 and broadcast; then a plain
loop: fetch the step's micro-batches, count their supervised tokens across ranks, and backprop each micro-batch's
summed loss divided by that global count, so every supervised token weighs the same whatever the packing, the
number of ranks or of micro-steps. Gradients are summed across ranks (divide factor 1) to match.
"""

import json
import math
import os
import resource
import shutil
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist

# -----------------------------------------------------------------------------------------------------------------
# I/O
out_dir = "out"  # checkpoints, log.jsonl, TensorBoard events, the final model
init_from = "hf"  # "hf": towers from vision_path/lm_path; "resume": latest checkpoint in out_dir; or a path to
#                   a previous run's out_dir/final (towers from the paths below, then the weights that run trained)
vision_path = "data/synthetic/vision"  # HF directory (or hub id) of a CLIP/SigLIP vision tower
lm_path = "data/synthetic/lm"  # HF directory (or hub id) of a causal LM and its tokenizer
eval_only = False  # evaluate (init_from) and exit
# model
projector = "mlp2x_gelu"  # "mlp2x_gelu" | "linear"
pool_stride = 1  # average-pool each frame's patch grid by this factor before the projector
vision_select_layer = -2  # LLaVA: features of the second-to-last vision block
# data
train_data = "data/synthetic/something-something-v2_train.json"  # LLaVA-format JSON list
val_data = "data/synthetic/something-something-v2_val.json"
media_root = "data/synthetic/20bn-something-something-v2"  # `video`/`image` paths are relative to this
template = "plain"  # "plain" (stage 1) | "chat" (the tokenizer's chat template) | "vicuna_v1"
num_frames = 8  # frames sampled per video (TSN-style in training, uniform in evaluation)
max_tokens = 1024  # tokens per row (text + visual)
packing = True  # several samples per row (document-masked) instead of one padded sample per row
max_frames_per_row = 64  # caps the vision work of a packed row
num_workers = 2  # DataLoader workers per rank
max_bad_fraction = 0.01  # stop when more than this fraction of samples is unreadable
# stages: what trains
train_vision = False
train_projector = True
train_lm = False
# optimisation
batch_size = 4  # rows per micro-step per rank
global_batch_size = 8  # rows per optimizer step: batch_size x ranks x gradient accumulation
max_steps = 500
learning_rate = 1e-3  # projector
lm_learning_rate = 2e-5  # LM (when train_lm)
vision_learning_rate = 2e-6  # vision tower (when train_vision)
min_lr_ratio = 0.0  # cosine decays each group's lr to this fraction of its peak
warmup_ratio = 0.03  # linear warmup over this fraction of max_steps
weight_decay = 0.0  # not applied to norms, biases and embeddings
beta1 = 0.9
beta2 = 0.999
grad_clip = 1.0  # 0 = off
max_bad_steps = 5  # consecutive non-finite losses/grad norms (steps skipped) before the run stops
seed = 1337
# system
device = "auto"  # "auto": cuda if available, else cpu
dtype = "auto"  # "auto": bfloat16 on cuda (fp32 master weights and reductions), float32 on cpu
compile = True  # torch.compile each block for training (evaluation runs eager); faster on CPU too (README)
activation_checkpointing = False  # recompute each block in backward: less memory, ~30% more compute
# evaluation, logging, checkpoints
eval_interval = 100  # steps; also at the end
eval_samples = 200  # validation samples for loss and exact-match accuracy (0 = all)
eval_batch_size = 16
max_new_tokens = 24  # for greedy answers
eval_label_set = False  # label-set tasks (SSv2): also score every distinct validation answer by likelihood (top-1,
# top-5, per class, direction pairs), and again with each clip's frames shuffled (does the model use their order?)
eval_strips = 4  # validation clips shown in TensorBoard at each evaluation: frames, reference and answer
log_interval = 10
ckpt_interval = 100
keep_last = 2
# -----------------------------------------------------------------------------------------------------------------

from nanovlm import checkpoint, data, hf, scoring  # noqa: E402  (after the defaults, which are the docs)
from nanovlm.config import ConfigError, configure  # noqa: E402
from nanovlm.metrics import FlopCounter, peak_flops  # noqa: E402
from nanovlm.model import IGNORE, VLM, build, load_trained, vlm_config  # noqa: E402


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def check_config(c, world_size):
    """Everything that can be known wrong before heavy work, one line each, in well under a second: it reads only
    the towers' config.json files and writes nothing. (Building the model or the data would find some of these
    too, but only after loading weights and tokenizing, and as tracebacks.)"""
    min_text = 32  # tokens a row must have left after one video's visual tokens, for a prompt and an answer
    for key in ("batch_size", "global_batch_size", "max_steps", "num_frames", "max_tokens", "max_frames_per_row",
                "pool_stride", "eval_batch_size", "log_interval", "eval_interval", "ckpt_interval", "keep_last",
                "max_bad_steps"):
        if c[key] < 1:
            raise ConfigError(f"{key}={c[key]} must be at least 1")
    for key, choices in (("projector", ("mlp2x_gelu", "linear")), ("template", data.TEMPLATES),
                         ("device", ("auto", "cpu", "cuda")), ("dtype", ("auto", "bfloat16", "float32"))):
        if c[key] not in choices:
            raise ConfigError(f"{key}={c[key]!r} is not one of {', '.join(choices)}")
    for key in ("train_data", "val_data", "media_root"):
        if not os.path.exists(c[key]):
            raise ConfigError(f"{key}={c[key]!r} does not exist (run `python prepare.py` for the demo data)")
    for key in ("vision_path", "lm_path"):
        if not os.path.isdir(c[key]) and not (c[key].count("/") == 1 and not c[key].startswith((".", "/"))):
            raise ConfigError(f"{key}={c[key]!r} is neither a directory nor a hub id")
    per_step = c["batch_size"] * world_size
    if c["global_batch_size"] % per_step:
        raise ConfigError(f"global_batch_size={c['global_batch_size']} is not divisible by batch_size x ranks = "
                          f"{c['batch_size']} x {world_size}")
    if not (c["train_vision"] or c["train_projector"] or c["train_lm"]):
        raise ConfigError("nothing to train: set one of train_vision, train_projector, train_lm")
    if c["init_from"] not in ("hf", "resume") and \
            not os.path.isfile(os.path.join(c["init_from"], "trained.safetensors")):
        raise ConfigError(f"init_from={c['init_from']!r}: expected 'hf', 'resume' or a run's final/ directory")
    existing = os.path.abspath(c["out_dir"])  # the directory that makedirs(out_dir) would write into
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK):
        raise ConfigError(f"out_dir={c['out_dir']!r} is not writable: {existing} is "
                          f"{'read-only' if os.path.isdir(existing) else 'a file'}; choose another out_dir")
    cxx = os.environ.get("CXX", "g++")  # what torch.compile builds CPU kernels with
    if c["compile"] and not uses_cuda(c["device"]) and not shutil.which(cxx):
        raise ConfigError(f"compile=True needs a C++ compiler on the CPU and {cxx!r} is not found: install one "
                          f"(apt-get install g++) or pass --compile=False")
    if c["max_frames_per_row"] < c["num_frames"]:
        raise ConfigError(f"max_frames_per_row={c['max_frames_per_row']} cannot hold one video of "
                          f"num_frames={c['num_frames']}; raise it")
    if not (os.path.isdir(c["vision_path"]) and os.path.isdir(c["lm_path"])):
        return  # hub ids: their config.json is checked once downloaded
    try:  # architecture, vision_select_layer, and the visual tokens per frame, from the config.json files alone
        cfg = vlm_config(c["vision_path"], c["lm_path"], c["projector"], c["pool_stride"], c["vision_select_layer"])
    except (OSError, ValueError) as e:
        raise ConfigError(str(e)) from None
    except KeyError as e:
        raise ConfigError(f"a config.json in {c['vision_path']} or {c['lm_path']} lacks the key {e}") from None
    num_visual = c["num_frames"] * cfg.tokens_per_frame
    if c["max_tokens"] - num_visual < min_text:
        raise ConfigError(f"num_frames={c['num_frames']} x {cfg.tokens_per_frame} tokens per frame = {num_visual} "
                          f"visual tokens leave {c['max_tokens'] - num_visual} of max_tokens={c['max_tokens']} for "
                          f"text (at least {min_text} needed); raise max_tokens or pool_stride, or lower "
                          f"num_frames")


def resolve(path):
    """A hub id becomes a local snapshot (needs network access the first time)."""
    if os.path.isdir(path):
        return path
    from huggingface_hub import snapshot_download
    return snapshot_download(path)


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


def build_model(cfg, device, dtype, rank):
    """FSDP2-sharded model; weights read from disk by rank 0 only and broadcast (one full copy in all)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    full_state = {}
    if rank == 0:
        torch.manual_seed(seed)  # the projector's init
        full = build(cfg, "cpu")
        hf.load_vision(full.vision, vision_path)
        hf.load_lm(full.lm, lm_path)
        if init_from not in ("hf", "resume"):  # a previous run's trained weights: e.g. stage 1's projector
            load_trained(full, os.path.join(init_from, "trained.safetensors"))
        full_state = full.state_dict()
    with torch.device("meta"):
        model = VLM(cfg)
    model.vision.requires_grad_(train_vision)
    model.projector.requires_grad_(train_projector)
    model.lm.requires_grad_(train_lm)
    model.lm.grad_checkpointing = model.vision.grad_checkpointing = activation_checkpointing
    mesh = dist.device_mesh.init_device_mesh(device.type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype != torch.float32 else None
    fsdp_kwargs = dict(mesh=mesh, **({"mp_policy": mp} if mp else {}))
    for block in [*model.vision.layers, *model.lm.layers]:
        if compile:
            block.compile()
        fully_shard(block, **fsdp_kwargs)
    fully_shard(model, **fsdp_kwargs)
    model.to_empty(device=device)
    model.lm.init_weights()  # RoPE buffers: not in any state dict
    set_model_state_dict(model, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full_state
    # loss is divided by the global supervised-token count, so gradients must be summed, not averaged, over ranks;
    # each fully_shard unit (every block and the root) reduces its own gradients and needs telling
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            if device.type == "cpu":
                module.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM
    return model


def make_optimizer(model, device):
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = name.split(".")[0]  # vision | projector | lm
        lr = {"vision": vision_learning_rate, "projector": learning_rate, "lm": lm_learning_rate}[part]
        decay = p.ndim >= 2 and "embed" not in name  # no decay on norms, biases, embeddings
        groups.setdefault((part, decay), {"params": [], "lr": lr, "peak_lr": lr,
                                          "weight_decay": weight_decay if decay else 0.0})["params"].append(p)
    return torch.optim.AdamW(list(groups.values()), betas=(beta1, beta2), fused=True)  # CPU too: 1.13x a step


def lr_factor(step):
    """Linear warmup to 1, then cosine to min_lr_ratio at max_steps."""
    warmup = max(1, round(warmup_ratio * max_steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def all_reduce(values, device):
    """Sum a list of numbers (or 0-d tensors) over ranks in one collective."""
    t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])
    dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
@torch.compiler.set_stance("force_eager")  # a KV cache and left padding would recompile the blocks layer by layer
def evaluate(model, val_set, tokenizer, device, autocast, world_size, rank, writer=None, step=0):
    """Validation loss (per supervised token) and exact-match accuracy of greedy answers, over all ranks; with
    eval_label_set, likelihood scoring of the label set with frames in order and shuffled (nanovlm/scoring.py)."""
    model.eval()
    loss_sum, count, correct, answered = 0.0, 0, 0, 0
    if eval_label_set:
        labels, choices = scoring.candidates(val_set)
        index, K = {label: i for i, label in enumerate(labels)}, len(labels)
        tallies = torch.zeros(2, K * K + 1, dtype=torch.float64)  # in order / shuffled: confusion, top-5 hits
        shuffler = torch.Generator().manual_seed(seed)
    for b, batch in enumerate(data.eval_batches(val_set, eval_batch_size, rank, world_size, eval_samples)):
        batch = to_device(batch, device)
        with autocast:
            loss, n = model(batch["input_ids"], batch["frames"], batch["targets"], batch["position_ids"],
                            batch["document_ids"])
        loss_sum, count = loss_sum + loss.item(), count + n.item()
        with autocast:
            answers = model.generate(batch["prompts"], batch["prompt_frames"], max_new_tokens=max_new_tokens,
                                     eos_id=tokenizer.eos_token_id, distributed=world_size > 1)
        answers = [tokenizer.decode(ids, skip_special_tokens=True) for ids in answers]
        for answer, reference in zip(answers, batch["answers"]):
            correct += data.normalize_answer(answer) == data.normalize_answer(reference)
            answered += 1
        counts = scoring.frame_counts(batch["prompts"], model.cfg.tokens_per_frame)
        if eval_label_set:
            references = torch.tensor([index[a] for a in batch["answers"]])
            shuffled = scoring.shuffle_frames(batch["prompt_frames"], counts, shuffler)
            for tally, frames in zip(tallies, (batch["prompt_frames"], shuffled)):
                with autocast:
                    scores = model.score(batch["prompts"], frames, choices).cpu()
                tally[:K * K].view(K, K).index_put_((references, scores.argmax(1)),
                                                    torch.ones(len(references), dtype=torch.float64), accumulate=True)
                tally[-1] += (scores.topk(min(5, K)).indices == references[:, None]).any(1).sum()
        if writer is not None and b == 0:
            show_clips(writer, step, batch, counts, answers, val_set.preprocess)
    loss_sum, count, correct, answered = all_reduce([loss_sum, count, correct, answered], device)
    metrics = {"val_loss": loss_sum / max(count, 1), "val_accuracy": correct / max(answered, 1),
               "val_samples": int(answered)}
    if eval_label_set:
        tallies = tallies.to(device)
        dist.all_reduce(tallies)
        pairs = scoring.direction_pairs(labels)
        for name, tally in zip(("", "_shuffled"), tallies.cpu()):
            for k, v in scoring.summary(tally[:K * K].view(K, K), tally[-1], labels, pairs).items():
                metrics[f"val_{k}{name}"] = v
    model.train()
    return metrics


def show_clips(writer, step, batch, counts, answers, pre):
    """TensorBoard: the first eval_strips clips of a validation batch as frame strips, with reference and answer."""
    mean, std = torch.tensor(pre.mean).view(3, 1, 1), torch.tensor(pre.std).view(3, 1, 1)
    frames = batch["prompt_frames"].float().cpu().split(counts)
    for i, (clip, reference, answer) in enumerate(zip(frames[:eval_strips], batch["answers"], answers)):
        if len(clip):
            strip = torch.cat(list(clip), dim=2) * std + mean  # (3, H, frames * W), back to [0, 1]
            writer.add_image(f"val_clip_{i}", strip.clamp(0, 1), step)
        writer.add_text(f"val_clip_{i}", f"reference: {reference}  \nanswer: {answer}", step)


def main():
    try:
        config = configure(globals(), sys.argv[1:])
        world_size = int(os.environ.get("WORLD_SIZE", 1))
        check_config(config, world_size)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    device = setup_distributed(globals()["device"])
    rank, world_size = dist.get_rank(), dist.get_world_size()
    dt = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "bfloat16": torch.bfloat16,
          "float32": torch.float32}[globals()["dtype"]]
    autocast = torch.autocast(device.type, dtype=dt) if dt != torch.float32 else nullcontext()
    globals().update(vision_path=resolve(vision_path), lm_path=resolve(lm_path))
    grad_accum = global_batch_size // (batch_size * world_size)
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(config, f, indent=1)
        print0(json.dumps(config, indent=1))

    cfg = vlm_config(vision_path, lm_path, projector, pool_stride, vision_select_layer)
    model = build_model(cfg, device, dt, rank)
    optimizer = make_optimizer(model, device)
    tokenizer = data.load_tokenizer(lm_path)
    common = dict(tokenizer=tokenizer, media_root=media_root, vision_path=vision_path, template=template,
                  num_frames=num_frames, tokens_per_frame=cfg.tokens_per_frame, max_tokens=max_tokens)
    val_set = data.VLMDataset(val_data, train=False, seed=seed, **common)
    step, position = 0, (0, 0)
    if init_from == "resume":
        path = checkpoint.latest(os.path.join(out_dir, "ckpt"))
        if path is None:
            print0(f"init_from='resume' but no complete checkpoint in {out_dir}/ckpt: starting from scratch")
        else:
            extra = checkpoint.load(path, model, optimizer)
            step, position = extra["step"], tuple(extra["data_position"])
            print0(f"resumed from {path} at step {step}")
    if eval_only:
        metrics = evaluate(model, val_set, tokenizer, device, autocast, world_size, rank)
        print0(json.dumps(metrics))
        if rank == 0:
            with open(os.path.join(out_dir, "eval.json"), "w") as f:
                json.dump(metrics, f, indent=1)
        dist.destroy_process_group()
        return

    train_set = data.VLMDataset(train_data, train=True, seed=seed, **common)
    batches = data.TrainBatches(train_set, batch_size, rank, world_size, max_tokens, max_frames_per_row, packing,
                                seed, num_workers, start=position)
    monitor = data.BadSampleMonitor(max_bad_fraction)
    flops = FlopCounter(model, train_vision, train_projector, train_lm)
    peak, peak_source = peak_flops(device, dt)
    print0(f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
           f"{sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.1f}M trained; "
           f"{world_size} ranks x {batch_size} rows x {grad_accum} micro-steps; peak {peak / 1e12:.2f} TFLOP/s "
           f"({peak_source})")
    writer = log_file = bar = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm
        writer = SummaryWriter(out_dir)
        log_file = open(os.path.join(out_dir, "log.jsonl"), "a")
        bar = tqdm(total=max_steps, initial=step, dynamic_ncols=True)
    params = [p for p in model.parameters() if p.requires_grad]
    bad_steps = 0

    def log(metrics):
        if rank == 0:
            for k, v in metrics.items():
                if k != "step" and isinstance(v, (int, float)):  # per-class tables go to eval.json only
                    writer.add_scalar(k, v, metrics["step"])
            log_file.write(json.dumps(metrics) + "\n")
            log_file.flush()

    def save_checkpoint():
        checkpoint.save(os.path.join(out_dir, "ckpt"), step, model, optimizer,
                        {"step": step, "data_position": batches.position}, keep_last=keep_last)

    while step < max_steps:
        t0 = time.perf_counter()
        micro = [next(batches) for _ in range(grad_accum)]  # the whole step's data: the global count needs it
        t_data = time.perf_counter() - t0
        skipped, samples = sum(b["num_skipped"] for b in micro), sum(b["num_samples"] for b in micro)
        supervised = [int((b["targets"] != IGNORE).sum()) for b in micro]  # counted once, on the CPU tensors
        global_count, skipped, samples = all_reduce([sum(supervised), skipped, samples], device)
        monitor.update(int(samples), int(skipped))
        for g in optimizer.param_groups:
            g["lr"] = g["peak_lr"] * lr_factor(step)
        loss_sum, step_flops, tokens = torch.zeros((), device=device), 0.0, 0
        for b, num_supervised in zip(micro, supervised):
            step_flops += flops(b["document_ids"], num_supervised, b["frames"].shape[0])
            tokens += int((b["document_ids"] >= 0).sum())
            b = to_device(b, device)
            with autocast:
                loss, _ = model(b["input_ids"], b["frames"], b["targets"], b["position_ids"], b["document_ids"])
            (loss / max(global_count, 1)).backward()
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        loss_sum, step_flops, tokens = all_reduce([loss_sum, step_flops, tokens], device)
        loss_value = loss_sum / max(global_count, 1)
        # both values are reduced over all ranks, so a NaN on one rank skips the step on every rank alike
        if math.isfinite(loss_value) and torch.isfinite(grad_norm):
            optimizer.step()
            bad_steps = 0
        else:
            bad_steps += 1
            print0(f"\nwarning: step {step + 1}: loss {loss_value} / grad norm {grad_norm.item()} is not finite; "
                   f"optimizer step skipped ({bad_steps} in a row, max_bad_steps={max_bad_steps})", file=sys.stderr)
            if bad_steps >= max_bad_steps:
                print0(f"\nstopping at step {step + 1}: {bad_steps} non-finite steps in a row; the last complete "
                       f"checkpoint is in {out_dir}/ckpt; lower the learning rate or check the data", file=sys.stderr)
                dist.destroy_process_group()
                sys.exit(1)
        optimizer.zero_grad(set_to_none=True)
        step += 1
        dt_step = time.perf_counter() - t0
        metrics = {"step": step, "loss": loss_value, "lr": learning_rate * lr_factor(step - 1),
                   "grad_norm": grad_norm.item(), "tokens_per_s": tokens / dt_step,
                   "mfu": step_flops / dt_step / (peak * world_size), "data_wait": t_data / dt_step,
                   "peak_memory_gb": (torch.cuda.max_memory_allocated() if device.type == "cuda" else
                                      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 1e9,
                   "skipped_samples": monitor.num_bad}
        if rank == 0:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
        if step % log_interval == 0 or step == max_steps:
            log(metrics)
        if step % eval_interval == 0 or step == max_steps:
            metrics = {"step": step, **evaluate(model, val_set, tokenizer, device, autocast, world_size, rank,
                                                writer, step)}
            print0(f"\nstep {step}: val loss {metrics['val_loss']:.4f}, accuracy {metrics['val_accuracy']:.3f}" + (
                f", top-1 {metrics['val_top1']:.3f} (frames shuffled: {metrics['val_top1_shuffled']:.3f})"
                if eval_label_set else ""))
            log(metrics)
        if step % ckpt_interval == 0 or step == max_steps:
            save_checkpoint()

    final = os.path.join(out_dir, "final")
    checkpoint.export_safetensors(model, os.path.join(final, "trained.safetensors"))
    if rank == 0:
        with open(os.path.join(final, "nanovlm.json"), "w") as f:
            json.dump({"vision_path": vision_path, "lm_path": lm_path, "projector": projector,
                       "pool_stride": pool_stride, "vision_select_layer": vision_select_layer,
                       "template": template, "num_frames": num_frames}, f, indent=1)
        tokenizer.save_pretrained(final)
        bar.close()
        writer.close()
        print0(f"done: {step} steps; {monitor.num_bad} unreadable samples skipped; trained weights in {final}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
