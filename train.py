"""Train a video VLM: `torchrun --nproc_per_node=N train.py config/X.py --key=value ...` (or `python train.py ...`).

The defaults below are the documentation. Order of work: the settings are checked (unknown keys, types, paths,
batch arithmetic) before anything is written or loaded, and travel as one Config object (`c`) that every
function here receives; the model is built on the meta device, sharded by `nanovlm.parallel.parallelize`
(activation checkpointing, compile, `fully_shard` per block, then the root), and every rank reads only its rows of
the checkpoints; then a plain loop: fetch the step's micro-batches, count their supervised tokens across ranks, and
backprop each micro-batch's summed loss divided by that global count, so every supervised token weighs the same
whatever the packing, the number of ranks or of micro-steps. Gradients are summed across ranks (divide factor 1)
to match. Every rank issues the same collectives whatever its batch holds (text only, unreadable media, no
validation sample at all): the towers always run, on a blank frame if need be.
"""

import json
import math
import os
import random
import resource
import shutil
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open

# -----------------------------------------------------------------------------------------------------------------
# I/O
out_dir = "out"  # checkpoints, log.jsonl, TensorBoard events, the final model
init_from = "hf"  # where this stage starts: "hf", the towers from vision_path/lm_path; or a previous run's
#                   out_dir/final (the towers, then every tensor that run holds: what it trained and inherited)
resume = False  # continue this run from the newest complete checkpoint in out_dir/ckpt, on any number of ranks
#                 (init_from is loaded first: the checkpoint holds only what this stage trains)
vision_path = "data/synthetic/vision"  # HF directory (or hub id) of a CLIP/SigLIP vision tower
lm_path = "data/synthetic/lm"  # HF directory (or hub id) of a causal LM and its tokenizer
eval_only = False  # evaluate (init_from, or with resume the newest checkpoint) and exit
# model
projector = "mlp2x_gelu"  # "mlp2x_gelu" | "linear"
pool_stride = 1  # average-pool each frame's patch grid by this factor before the projector
vision_select_layer = -2  # LLaVA: features of the second-to-last vision block
# data
train_data = "data/synthetic/something-something-v2_train.json"  # LLaVA-format JSON list
val_data = "data/synthetic/something-something-v2_val.json"
media_root = "data/synthetic/20bn-something-something-v2"  # `video`/`image` paths are relative to this
datasets = []  # a mixture instead of the three above, each drawn by its weight (README, Data): [dict(name="ssv2",
#                train_data=..., val_data=..., media_root=..., weight=0.5), ...]; an entry may set its own num_frames,
#                fps, max_frames, eval_label_set; validation metrics are reported under each name ("ssv2/val_loss")
template = "plain"  # "plain" (stage 1) | "chat" (the tokenizer's chat template) | "vicuna_v1"
num_frames = 8  # frames sampled per video (TSN-style in training, uniform in evaluation)
fps = 0.0  # > 0: frames by time instead, fps of them per second of video (at least 1), at most max_frames
max_frames = 32  # the frame budget of one video when fps > 0 (LLaVA-Video: fps=1, max_frames=64)
time_instruction = False  # prompt says each video's duration and frame times ("The video lasts 20.0 seconds; 8 ...")
max_tokens = 1024  # tokens per row (text + visual)
packing = True  # several samples per row (document-masked) instead of one padded sample per row
max_frames_per_row = 64  # caps the vision work of a packed row
num_workers = 2  # DataLoader workers per rank
max_bad_fraction = 0.01  # stop when more than this fraction of samples is unreadable
# stages: what trains
train_vision = False
train_projector = True
train_lm = False
lora_rank = 0  # > 0: LoRA adapters of this rank on lora_targets train in place of those parts' weights (the rest
#                of a targeted part is frozen); final/ holds the merged weights
lora_alpha = 16.0  # adapter output scaled by lora_alpha / lora_rank
lora_dropout = 0.0  # on the adapters' input, in training
lora_targets = ["lm.qkv", "lm.o", "lm.gate_up", "lm.down"]  # also vision.qkv, vision.o, vision.fc1, vision.fc2
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
eval_score_chunk = 256  # label-set scoring: candidate tokens continuing the prompts at once (memory: the prompts'
#                         KV cache + this many tokens per prompt, whatever the number of candidates)
eval_strips = 4  # validation clips shown in TensorBoard at each evaluation: frames, reference and answer
log_interval = 10
ckpt_interval = 100
keep_last = 2
preempt_signal = "SIGTERM"  # on it, every rank stops after the current step, checkpoints and exits 0 (Slurm sends
#                             SIGTERM before SIGKILL; "SIGUSR1" for sbatch --signal=USR1@120)
# -----------------------------------------------------------------------------------------------------------------

from nanovlm import checkpoint, data, lifecycle, llava, lora, scoring  # noqa: E402  (after the defaults, which are the docs)
from nanovlm.config import Config, ConfigError, configure, defaults  # noqa: E402
from nanovlm.metrics import FlopCounter, peak_flops  # noqa: E402
from nanovlm.model import IGNORE, vlm_config  # noqa: E402
from nanovlm.parallel import build_sharded, setup_distributed, uses_cuda  # noqa: E402

DEFAULTS = defaults(vars())  # the settings above, collected once; configure() starts from a copy


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def settings(argv) -> Config:
    """The run's settings from config files and --key=value arguments, checked; a bad one ends the process with
    exit code 2 and one line on stderr, before anything is loaded or written."""
    try:
        c = configure(DEFAULTS, argv)
        start_from_llava(c)
        check_config(c, int(os.environ.get("WORLD_SIZE", 1)))
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    return c


def check_config(c: Config, world_size):
    """Everything that can be known wrong before heavy work, one line each, in well under a second: it reads only
    the towers' config.json files and writes nothing. (Building the model or the data would find some of these
    too, but only after loading weights and tokenizing, and as tracebacks.)"""
    min_text = 32  # tokens a row must have left after one video's visual tokens, for a prompt and an answer
    for key in ("batch_size", "global_batch_size", "max_steps", "num_frames", "max_tokens", "max_frames_per_row",
                "pool_stride", "eval_batch_size", "log_interval", "eval_interval", "ckpt_interval", "keep_last",
                "max_bad_steps", "eval_score_chunk"):
        if getattr(c, key) < 1:
            raise ConfigError(f"{key}={getattr(c, key)} must be at least 1")
    for key, choices in (("projector", ("mlp2x_gelu", "linear")), ("template", data.TEMPLATES),
                         ("device", ("auto", "cpu", "cuda")), ("dtype", ("auto", "bfloat16", "float32"))):
        if getattr(c, key) not in choices:
            raise ConfigError(f"{key}={getattr(c, key)!r} is not one of {', '.join(choices)}")
    entries = check_datasets(c)
    for key in ("vision_path", "lm_path"):
        check_tower_path(key, getattr(c, key))
    if c.global_batch_size % (c.batch_size * world_size):
        raise ConfigError(f"global_batch_size={c.global_batch_size} is not divisible by batch_size x ranks = "
                          f"{c.batch_size} x {world_size}")
    if not (c.train_vision or c.train_projector or c.train_lm):
        raise ConfigError("nothing to train: set one of train_vision, train_projector, train_lm")
    if c.lora_rank < 0 or (c.lora_rank and not c.lora_targets):
        raise ConfigError(f"lora_rank={c.lora_rank} with lora_targets={c.lora_targets}: a rank >= 0, and targets")
    for target in c.lora_targets if c.lora_rank else []:
        if target not in lora.TARGETS:
            raise ConfigError(f"lora_targets has {target!r}, not one of {', '.join(lora.TARGETS)}")
        if not getattr(c, f"train_{target.split('.')[0]}"):
            raise ConfigError(f"lora_targets has {target!r} but train_{target.split('.')[0]}=False: nothing of it "
                              f"would train; set train_{target.split('.')[0]}=True (with lora_rank > 0 that part "
                              f"trains through its adapters only)")
    if c.init_from == "resume":
        raise ConfigError("init_from='resume' is now resume=True: init_from says where a stage starts (its towers "
                          "and a previous stage's final/), resume continues this run; pass --resume=True")
    if c.init_from != "hf" and not os.path.isfile(os.path.join(c.init_from, "trained.safetensors")) and \
            llava.read_llava(c.init_from) is None:
        raise ConfigError(f"init_from={c.init_from!r}: expected 'hf', a run's final/ directory or a LLaVA checkpoint")
    if c.preempt_signal not in ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT"):
        raise ConfigError(f"preempt_signal={c.preempt_signal!r} is not one of SIGTERM, SIGUSR1, SIGUSR2, SIGINT")
    existing = os.path.abspath(c.out_dir)  # the directory that makedirs(out_dir) would write into
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK):
        raise ConfigError(f"out_dir={c.out_dir!r} is not writable: {existing} is "
                          f"{'read-only' if os.path.isdir(existing) else 'a file'}; choose another out_dir")
    cxx = os.environ.get("CXX", "g++")  # what torch.compile builds CPU kernels with
    if c.compile and not uses_cuda(c.device) and not shutil.which(cxx):
        raise ConfigError(f"compile=True needs a C++ compiler on the CPU and {cxx!r} is not found: install one "
                          f"(apt-get install g++) or pass --compile=False")
    if not (os.path.isdir(c.vision_path) and os.path.isdir(c.lm_path)):
        return  # hub ids: their config.json is checked once downloaded
    try:  # architecture, vision_select_layer, and the visual tokens per frame, from the config.json files alone
        cfg = vlm_config(c.vision_path, c.lm_path, c.projector, c.pool_stride, c.vision_select_layer)
    except (OSError, ValueError) as e:
        raise ConfigError(str(e)) from None
    except KeyError as e:
        raise ConfigError(f"a config.json in {c.vision_path} or {c.lm_path} lacks the key {e}") from None
    for where, key, frames in entries:
        num_visual = frames * cfg.tokens_per_frame
        if c.max_tokens - num_visual < min_text:
            raise ConfigError(f"{where}{key}={frames} x {cfg.tokens_per_frame} tokens per frame = {num_visual} "
                              f"visual tokens leave {c.max_tokens - num_visual} of max_tokens={c.max_tokens} for text "
                              f"(at least {min_text} needed); raise max_tokens or pool_stride, or lower {key}")


def check_datasets(c: Config):
    """The datasets' entries (data.dataset_entries), their paths, and one video per row -> (where, key, frames)
    of each: the frames of its longest video and the setting that gives them."""
    try:
        entries = data.dataset_entries(c)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    videos = []
    for entry in entries:
        where = f"datasets {entry['name']!r}: " if entry["name"] else ""
        for key in ("train_data", "val_data", "media_root"):
            if (entry[key] or not entry["name"]) and not os.path.exists(entry[key]):
                raise ConfigError(f"{where}{key}={entry[key]!r} does not exist (run `python prepare.py` for the demo "
                                  f"data)")
        if entry["fps"] < 0:
            raise ConfigError(f"{where}fps={entry['fps']} must be 0 (num_frames per video) or above")
        key = "max_frames" if entry["fps"] > 0 else "num_frames"
        if entry[key] < 1:
            raise ConfigError(f"{where}{key}={entry[key]} must be at least 1")
        if c.max_frames_per_row < entry[key]:
            raise ConfigError(f"max_frames_per_row={c.max_frames_per_row} cannot hold one video of {where}"
                              f"{key}={entry[key]}; raise it")
        videos.append((where, key, entry[key]))
    return videos


def start_from_llava(c: Config):
    """init_from a published LLaVA checkpoint (nanovlm/llava.py): a llava-hf directory, an original LLaVA one, or
    a stage-1 mm_projector.bin. The settings it fixes must agree with the run's; its towers become the run's."""
    if c.init_from in ("hf", "resume"):
        return
    try:
        info = llava.read_llava(c.init_from)
        if info is not None:
            llava.check_settings(info, projector=c.projector, pool_stride=c.pool_stride,
                                 vision_select_layer=c.vision_select_layer, vision_path=c.vision_path)
            c.vision_path, c.lm_path = llava.tower_paths(info, c.vision_path, c.lm_path)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_tower_path(key, path):
    """A tower is a local directory or a hub id ("org/name"). A path whose first part exists here, or that starts
    with . or /, is local: missing, it is an error here, not a hub lookup that fails later."""
    if os.path.isdir(path):
        return
    first = path.split("/")[0]
    if path.count("/") != 1 or path.startswith((".", "/")) or os.path.exists(first):
        raise ConfigError(f"{key}={path!r} is not a directory (and not a hub id); for data/smollm2 run "
                          f"`python prepare.py smollm2`, for the demo towers `python prepare.py`")


def resolve(path):
    """A hub id becomes a local snapshot (needs network access the first time)."""
    if os.path.isdir(path):
        return path
    from huggingface_hub import snapshot_download
    return snapshot_download(path)


def make_optimizer(model, c: Config):
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = name.split(".")[0]  # vision | projector | lm
        lr = {"vision": c.vision_learning_rate, "projector": c.learning_rate, "lm": c.lm_learning_rate}[part]
        decay = p.ndim >= 2 and "embed" not in name  # no decay on norms, biases, embeddings
        groups.setdefault((part, decay), {"params": [], "lr": lr, "peak_lr": lr,
                                          "weight_decay": c.weight_decay if decay else 0.0})["params"].append(p)
    return torch.optim.AdamW(list(groups.values()), betas=(c.beta1, c.beta2), fused=True)  # CPU too: 1.13x a step


def lr_factor(step, c: Config):
    """Linear warmup to 1, then cosine to min_lr_ratio at max_steps."""
    warmup = max(1, round(c.warmup_ratio * c.max_steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, c.max_steps - warmup))
    return c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def all_reduce(values, device):
    """Sum a list of numbers (or 0-d tensors) over ranks in one collective."""
    t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])
    dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
@torch.compiler.set_stance("force_eager")  # a KV cache and right padding would recompile the blocks layer by layer
def evaluate(model, val_sets, tokenizer, device, autocast, c: Config, writer=None, step=0):
    """Every validation set of the run, [(name, dataset, eval_label_set)]: a named one's metrics are reported under
    its name ("ssv2/val_loss"), those of the one dataset of val_data as they are ("val_loss")."""
    metrics = {}
    for name, val_set, label_set in val_sets:
        found = evaluate_set(model, val_set, tokenizer, device, autocast, c, name, label_set, writer, step)
        metrics.update({(f"{name}/" if name else "") + key: value for key, value in found.items()})
    return metrics


def evaluate_set(model, val_set, tokenizer, device, autocast, c: Config, name="", label_set=False, writer=None,
                 step=0):
    """Validation loss (per supervised token) and exact-match accuracy of greedy answers, over all ranks; with
    label_set, likelihood scoring of the label set with frames in order and shuffled (nanovlm/scoring.py).
    Unreadable samples are warned about (each file by the rank that met it) and counted (val_skipped); a metric
    over no sample is left out, with a warning saying why, rather than reported as a number."""
    model.eval()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    loss_sum, count, correct, answered, skipped = 0.0, 0, 0, 0, 0
    labels = scorer = None
    if label_set:
        labels, choices = scoring.candidates(val_set)
        scorer = LabelSetTally(labels, choices, c)
    for b, batch in enumerate(data.eval_batches(val_set, c.eval_batch_size, rank, world_size, c.eval_samples)):
        batch = to_device(batch, device)
        with autocast:
            loss, n = model(batch["input_ids"], batch["frames"], batch["targets"], batch["position_ids"],
                            batch["document_ids"])
            answers = model.generate(batch["prompts"], batch["prompt_frames"], max_new_tokens=c.max_new_tokens,
                                     eos_id=tokenizer.eos_token_id, distributed=world_size > 1)
        loss_sum, count, skipped = loss_sum + loss.item(), count + n.item(), skipped + batch["num_skipped"]
        answers = [tokenizer.decode(ids, skip_special_tokens=True) for ids in answers]
        for answer, reference in zip(answers, batch["answers"]):
            correct += data.normalize_answer(answer) == data.normalize_answer(reference)
            answered += 1
        counts = scoring.frame_counts(batch["prompts"], model.cfg.tokens_per_frame)
        if scorer is not None:
            with autocast:
                scorer.add(model, batch, counts)
        if writer is not None and b == 0:
            show_clips(writer, step, batch, counts, answers, c.eval_strips, f"{name}/" if name else "")
    loss_sum, count, correct, answered, skipped = all_reduce([loss_sum, count, correct, answered, skipped], device)
    model.train()
    what, skipped = f"validation set {name!r}" if name else "the validation set", int(skipped) + val_set.num_skipped
    if skipped:  # unreadable when evaluated, or when the set was built (a record, a probe): each warned about above
        print0(f"warning: {skipped} unreadable samples of {what} skipped (see the warnings above)", file=sys.stderr)
    if not answered:
        print0(f"warning: no readable sample in {what} ({skipped} unreadable): no validation metrics",
               file=sys.stderr)
        return {"val_samples": 0, "val_skipped": skipped}
    metrics = {"val_loss": loss_sum / max(count, 1), "val_accuracy": correct / answered, "val_samples": int(answered),
               "val_skipped": skipped}
    if scorer is not None:
        metrics.update(scorer.metrics(device))
    return metrics


class LabelSetTally:
    """Confusion matrices and top-5 hits of label-set scoring, frames in order and shuffled within each clip."""

    def __init__(self, labels, choices, c: Config):
        self.labels, self.choices, self.chunk = labels, choices, c.eval_score_chunk
        self.index, K = {label: i for i, label in enumerate(labels)}, len(labels)
        self.tallies = torch.zeros(2, K * K + 1, dtype=torch.float64)  # in order / shuffled: confusion, top-5
        self.shuffler = torch.Generator().manual_seed(c.seed)

    def add(self, model, batch, counts):
        K = len(self.labels)
        references = torch.tensor([self.index[a] for a in batch["answers"]], dtype=torch.long)
        shuffled = scoring.shuffle_frames(batch["prompt_frames"], counts, self.shuffler)
        for tally, frames in zip(self.tallies, (batch["prompt_frames"], shuffled)):
            scores = model.score(batch["prompts"], frames, self.choices, self.chunk).cpu()
            tally[:K * K].view(K, K).index_put_((references, scores.argmax(1)),
                                                torch.ones(len(references), dtype=torch.float64), accumulate=True)
            tally[-1] += (scores.topk(min(5, K)).indices == references[:, None]).any(1).sum()

    def metrics(self, device):
        K, tallies = len(self.labels), self.tallies.to(device)
        dist.all_reduce(tallies)
        pairs, metrics = scoring.direction_pairs(self.labels), {}
        for name, tally in zip(("", "_shuffled"), tallies.cpu()):
            for k, v in scoring.summary(tally[:K * K].view(K, K), tally[-1], self.labels, pairs).items():
                metrics[f"val_{k}{name}"] = v
        return metrics


def show_clips(writer, step, batch, counts, answers, eval_strips, prefix=""):
    """TensorBoard: the first eval_strips clips of a validation batch as frame strips, with reference and answer."""
    frames = batch["prompt_frames"].cpu().split(counts)
    for i, (clip, reference, answer) in enumerate(zip(frames[:eval_strips], batch["answers"], answers)):
        if len(clip):
            writer.add_image(f"{prefix}val_clip_{i}", torch.cat(list(clip), dim=2), step)  # (3, H, frames * W) uint8
        writer.add_text(f"{prefix}val_clip_{i}", f"reference: {reference}  \nanswer: {answer}", step)


def train_step(model, optimizer, micro, c: Config, device, autocast, flops):
    """One optimizer step over this rank's micro-batches -> (loss per supervised token, grad norm, FLOPs, tokens),
    each over all ranks. A non-finite loss or gradient norm (reduced over all ranks, so every rank agrees) skips
    the optimizer step: the caller sees it in the returned values."""
    supervised = [int((b["targets"] != IGNORE).sum()) for b in micro]  # counted once, on the CPU tensors
    [global_count] = all_reduce([sum(supervised)], device)
    loss_sum, step_flops, tokens = torch.zeros((), device=device), 0.0, 0
    for b, num_supervised in zip(micro, supervised):
        step_flops += flops(b["document_ids"], num_supervised, b["frames"].shape[0])
        tokens += int((b["document_ids"] >= 0).sum())
        b = to_device(b, device)
        with autocast:
            loss, _ = model(b["input_ids"], b["frames"], b["targets"], b["position_ids"], b["document_ids"])
        (loss / max(global_count, 1)).backward()
        loss_sum += loss.detach()
    params = [p for p in model.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, c.grad_clip if c.grad_clip > 0 else float("inf"))
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    loss_sum, step_flops, tokens = all_reduce([loss_sum, step_flops, tokens], device)
    loss_value = loss_sum / max(global_count, 1)
    if math.isfinite(loss_value) and torch.isfinite(grad_norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_value, grad_norm.item(), step_flops, tokens


def write_final(model, c: Config, tokenizer, inherited=None):
    """out_dir/final: every tensor that differs from the base towers (trained here, or inherited from init_from and
    not retrained; LoRA adapters merged into the weights they adapt, and also in PEFT's layout under adapter/),
    where each part came from, the tokenizer."""
    final = os.path.join(c.out_dir, "final")
    trained = [name for name, p in model.named_parameters() if p.requires_grad and "lora_" not in name]
    if inherited is None:
        kept = []
    elif inherited.endswith("trained.safetensors"):
        kept = sorted(set(safe_open(inherited, "pt").keys()) - set(trained))
    else:  # a LLaVA checkpoint: its projector (its towers are this run's tower paths)
        kept = sorted({name for name, _ in model.named_parameters() if name.startswith("projector.")} - set(trained))
    adapted = sorted(lora.layers(model, c.lora_targets)) if c.lora_rank else []
    tensors = checkpoint.gather(model, trained + kept + [f"{p}.{s}" for p in adapted for s in
                                                          ("weight", "lora_A", "lora_B")])
    adapters = {p: (tensors.pop(f"{p}.lora_A"), tensors.pop(f"{p}.lora_B")) for p in adapted if tensors}
    for p, (A, B) in adapters.items():
        tensors[f"{p}.weight"] = lora.merge(tensors[f"{p}.weight"], A, B, c.lora_alpha)
    checkpoint.write_safetensors(tensors, os.path.join(final, "trained.safetensors"))
    if dist.get_rank() == 0:
        with open(os.path.join(final, "nanovlm.json"), "w") as f:
            json.dump({"vision_path": c.vision_path, "lm_path": c.lm_path, "projector": c.projector,
                       "pool_stride": c.pool_stride, "vision_select_layer": c.vision_select_layer,
                       "template": c.template, "num_frames": c.num_frames, "init_from": c.init_from,
                       "trained_here": sorted({name.split(".")[0] for name in trained + adapted}),
                       "inherited": sorted({name.split(".")[0] for name in kept} - {p.split(".")[0] for p in adapted}),
                       "lora": {"rank": c.lora_rank, "alpha": c.lora_alpha, "targets": c.lora_targets,
                                "merged": True} if adapted else None}, f, indent=1)
        tokenizer.save_pretrained(final)
        if any(p.startswith("lm.") for p in adapters):  # PEFT's layout, for the LM as a Hugging Face causal LM
            write_peft_adapter(os.path.join(final, "adapter"), adapters, model.cfg.lm, c)
    return final


def write_peft_adapter(path, adapters, cfg, c: Config):
    os.makedirs(path, exist_ok=True)
    modules = sorted({name for t in c.lora_targets if t.startswith("lm.") for name in
                      lora.LM_PROJECTIONS[t.split(".")[1]]})
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": c.lm_path,
                   "r": c.lora_rank, "lora_alpha": c.lora_alpha, "lora_dropout": c.lora_dropout,
                   "target_modules": modules, "bias": "none", "fan_in_fan_out": False}, f, indent=1)
    from safetensors.torch import save_file
    save_file(lora.peft_state_dict(adapters, cfg), os.path.join(path, "adapter_model.safetensors"))


class Logger:
    """Rank 0's log.jsonl, TensorBoard scalars and progress bar; the other ranks' do nothing."""

    def __init__(self, c: Config, rank, step):
        self.on = rank == 0
        if self.on:
            from torch.utils.tensorboard import SummaryWriter
            from tqdm import tqdm
            self.writer = SummaryWriter(c.out_dir)
            self.file = open(os.path.join(c.out_dir, "log.jsonl"), "a")
            self.bar = tqdm(total=c.max_steps, initial=step, dynamic_ncols=True)
        else:
            self.writer = None

    def log(self, metrics):
        if self.on:
            for k, v in metrics.items():
                if k != "step" and isinstance(v, (int, float)):  # per-class tables go to eval.json only
                    self.writer.add_scalar(k, v, metrics["step"])
            self.file.write(json.dumps(metrics) + "\n")
            self.file.flush()

    def progress(self, loss, tokens_per_s):
        if self.on:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:.0f}")

    def close(self):
        if self.on:
            self.bar.close()
            self.writer.close()


def run(c: Config, device, preemption=None):
    """Everything after the process group: model, data, the loop, the final weights."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    dt = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "bfloat16": torch.bfloat16,
          "float32": torch.float32}[c.dtype]
    autocast = torch.autocast(device.type, dtype=dt) if dt != torch.float32 else nullcontext()
    c.vision_path, c.lm_path = resolve(c.vision_path), resolve(c.lm_path)
    if rank == 0:
        with open(os.path.join(c.out_dir, "config.json"), "w") as f:
            json.dump(vars(c), f, indent=1)
        print0(json.dumps(vars(c), indent=1))
    cfg = vlm_config(c.vision_path, c.lm_path, c.projector, c.pool_stride, c.vision_select_layer)
    inherited = None if c.init_from == "hf" else c.init_from if llava.read_llava(c.init_from) else \
        os.path.join(c.init_from, "trained.safetensors")  # a LLaVA checkpoint, or a run's trained tensors
    model = build_sharded(cfg, device, c.vision_path, c.lm_path, c.seed, inherited, param_dtype=dt,
                          trainable={"vision": c.train_vision, "projector": c.train_projector, "lm": c.train_lm},
                          lora=dict(targets=c.lora_targets, rank=c.lora_rank, alpha=c.lora_alpha,
                                    dropout=c.lora_dropout) if c.lora_rank else None,
                          activation_checkpointing=c.activation_checkpointing, compile=c.compile)
    optimizer = None if c.eval_only else make_optimizer(model, c)
    tokenizer = data.load_tokenizer(c.lm_path)
    entries = data.dataset_entries(c)
    val_sets = [(e["name"], data.make_dataset(e, e["val_data"], False, c, tokenizer, cfg.tokens_per_frame),
                 e["eval_label_set"]) for e in entries if e["val_data"]]
    step, position = resume_run(model, optimizer, c) if c.resume else (0, (0, 0))
    if c.eval_only:
        metrics = evaluate(model, val_sets, tokenizer, device, autocast, c)
        print0(json.dumps(metrics))
        if rank == 0:
            with open(os.path.join(c.out_dir, "eval.json"), "w") as f:
                json.dump(metrics, f, indent=1)
        return
    train_sets = [data.make_dataset(e, e["train_data"], True, c, tokenizer, cfg.tokens_per_frame) for e in entries]
    train_set = train_sets[0] if len(train_sets) == 1 else data.Mixture(train_sets, [e["weight"] for e in entries])
    batches = data.TrainBatches(train_set, c.batch_size, rank, world_size, c.max_tokens, c.max_frames_per_row,
                                c.packing, c.seed, c.num_workers, start=position, pin_memory=device.type == "cuda",
                                rows_per_step=c.global_batch_size)
    skipped = train_loop(model, optimizer, batches, val_sets, tokenizer, c, device, autocast, dt, step, preemption)
    if skipped is None:
        return  # preempted: checkpointed, no final weights yet
    final = write_final(model, c, tokenizer, inherited)
    print0(f"done: {c.max_steps} steps; {skipped} unreadable samples skipped; weights in {final}")


def resume_run(model, optimizer, c: Config):
    """Load the newest complete checkpoint of this run (saved by any number of ranks) -> (step, data position)."""
    path = checkpoint.latest(os.path.join(c.out_dir, "ckpt"))
    if path is None:
        print0(f"resume=True but no complete checkpoint in {c.out_dir}/ckpt: starting from init_from={c.init_from!r}")
        return 0, (0, 0)
    extra, exact = checkpoint.load(path, model, optimizer)
    step = extra["step"]
    print0(f"resumed from {path} at step {step}")
    if not exact:
        rank = dist.get_rank()
        torch.manual_seed(c.seed + 1_000_003 * step + rank)
        random.seed(c.seed + 1_000_003 * step + rank)
        np.random.seed((c.seed + 1_000_003 * step + rank) % 2 ** 32)
        print0(f"note: {path} was saved by another number of ranks: weights, optimizer and data position are "
               f"resharded exactly, RNG states re-derived from (seed, step, rank); the continuation is bit-exact "
               f"only on the number of ranks that saved it")
    return step, tuple(extra["data_position"])


def train_loop(model, optimizer, batches, val_sets, tokenizer, c: Config, device, autocast, dt, step,
               preemption=None):
    """Steps from `step` to max_steps -> the number of unreadable samples skipped, or None if preempted (then a
    checkpoint of the last step is written)."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    grad_accum = c.global_batch_size // (c.batch_size * world_size)
    monitor = data.BadSampleMonitor(c.max_bad_fraction)
    adapted = {t.split(".")[0] for t in c.lora_targets} if c.lora_rank else set()  # no weight gradients there
    flops = FlopCounter(model, c.train_vision and "vision" not in adapted, c.train_projector,
                        c.train_lm and "lm" not in adapted)
    peak, peak_source = peak_flops(device, dt)
    print0(f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
           f"{sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.1f}M trained; "
           f"{world_size} ranks x {c.batch_size} rows x {grad_accum} micro-steps; peak {peak / 1e12:.2f} TFLOP/s "
           f"({peak_source})")
    logger, bad_steps = Logger(c, rank, step), 0
    while step < c.max_steps:
        t0 = time.perf_counter()
        micro = [next(batches) for _ in range(grad_accum)]  # the whole step's data: the global count needs it
        t_data = time.perf_counter() - t0
        skipped, samples = all_reduce([sum(b["num_skipped"] for b in micro), sum(b["num_samples"] for b in micro)],
                                      device)
        monitor.update(int(samples), int(skipped))
        for g in optimizer.param_groups:
            g["lr"] = g["peak_lr"] * lr_factor(step, c)
        loss, grad_norm, step_flops, tokens = train_step(model, optimizer, micro, c, device, autocast, flops)
        bad_steps = 0 if math.isfinite(loss) and math.isfinite(grad_norm) else bad_steps + 1
        if bad_steps:
            print0(f"\nwarning: step {step + 1}: loss {loss} / grad norm {grad_norm} is not finite; optimizer step "
                   f"skipped ({bad_steps} in a row, max_bad_steps={c.max_bad_steps})", file=sys.stderr)
            if bad_steps >= c.max_bad_steps:
                print0(f"\nstopping at step {step + 1}: {bad_steps} non-finite steps in a row; the last complete "
                       f"checkpoint is in {c.out_dir}/ckpt; lower the learning rate or check the data", file=sys.stderr)
                lifecycle.end_distributed()
                sys.exit(1)
        step += 1
        seconds = time.perf_counter() - t0
        metrics = {"step": step, "loss": loss, "lr": c.learning_rate * lr_factor(step - 1, c), "grad_norm": grad_norm,
                   "tokens_per_s": tokens / seconds, "mfu": step_flops / seconds / (peak * world_size),
                   "data_wait": t_data / seconds, "skipped_samples": monitor.num_bad,
                   "peak_memory_gb": (torch.cuda.max_memory_allocated() if device.type == "cuda" else
                                      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 1e9}
        logger.progress(loss, metrics["tokens_per_s"])
        if step % c.log_interval == 0 or step == c.max_steps:
            logger.log(metrics)
        if step % c.eval_interval == 0 or step == c.max_steps:
            metrics = {"step": step, **evaluate(model, val_sets, tokenizer, device, autocast, c, logger.writer, step)}
            for name in [key[:-len("val_loss")] for key in metrics if key.endswith("val_loss")]:  # "", "ssv2/", ...
                print0(f"\nstep {step}: {name}val loss {metrics[name + 'val_loss']:.4f}, accuracy "
                       f"{metrics[name + 'val_accuracy']:.3f}" + (f", top-1 {metrics[name + 'val_top1']:.3f} (frames "
                       f"shuffled: {metrics[name + 'val_top1_shuffled']:.3f})" if name + "val_top1" in metrics else ""))
            logger.log(metrics)
        [preempted] = all_reduce([preemption is not None and preemption.requested], device)  # all stop together
        if step % c.ckpt_interval == 0 or step == c.max_steps or preempted:
            path = checkpoint.save(os.path.join(c.out_dir, "ckpt"), step, model, optimizer,
                                   {"step": step, "data_position": batches.position}, keep_last=c.keep_last)
        if preempted and step < c.max_steps:
            logger.close()
            print0(f"\n{c.preempt_signal}: stopped after step {step}, checkpoint {path}; to continue, run the same "
                   f"command with --resume=True (on any number of ranks)")
            return None
    logger.close()
    return monitor.num_bad


def main(argv=None):
    c = settings(sys.argv[1:] if argv is None else argv)
    lock = None  # global rank 0 holds out_dir's lock until this process ends, however it ends
    if int(os.environ.get("RANK", 0)) == 0:
        try:
            lock = lifecycle.lock_out_dir(c.out_dir)
        except lifecycle.RunInUse as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    lifecycle.exit_with_launcher()
    device = setup_distributed(c.device)
    # after the process group: a rank still waiting for its peers (one of which failed) dies of torchrun's SIGTERM
    preemption = lifecycle.Preemption(c.preempt_signal)
    run(c, device, preemption)
    lifecycle.end_distributed()
    del lock


if __name__ == "__main__":
    main()
