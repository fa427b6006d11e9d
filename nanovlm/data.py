"""Training data: records (nanovlm/records.py) -> samples -> packed, resumable batches.

What is notable:
- Every text is tokenized once, at construction, so the lengths needed to pack are known before
  any video is decoded. A `<video>`/`<image>` placeholder is stored as one VISUAL_TOKEN and expanded
  to num_frames * tokens_per_frame positions when a sample is loaded.
- Packing: rows of up to max_tokens tokens and max_frames_per_row frames, first-fit over a window
  of open rows, in an order shuffled by (seed, epoch). Samples keep their own positions (restarting
  at 0) and a document id, so the model can mask attention to the same document.
- The data position to save in a checkpoint is (epoch, rows consumed in that epoch, all ranks):
  row k of an epoch is the same for any world size, so a run resumes exactly, even on more GPUs.
- Bad data never stops a run by itself: a malformed record is skipped at construction, an
  unreadable video/image when loaded (the sample becomes None and the batch counts it). Each is
  warned about once per process; BadSampleMonitor stops the run when too many are bad.
"""

import argparse
import bisect
import ctypes
import difflib
import functools
import hashlib
import json
import os
import re
import sys
import tempfile
import time

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from transformers import AutoTokenizer

from nanovlm.media import frame_count, load_image, load_preprocess, load_video, probe_duration, sample_frames
from nanovlm.model import IGNORE, VISUAL_TOKEN
from nanovlm.records import (PLACEHOLDER, TEMPLATES, check_record, encode, expand_visual,  # noqa: F401
                             ordered_media, read_records, validate_record, with_time_instruction)

_warned = set()


def _warn_once(key, message):
    if key not in _warned:
        _warned.add(key)
        print(f"warning: {message}", file=sys.stderr, flush=True)


def seeded_generator(*parts):
    """A torch.Generator seeded by a tuple such as (seed, epoch, index), without collisions."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


# -----------------------------------------------------------------------------
# the dataset

class UnreadableMedia(Exception):
    """A sample's medium that cannot be decoded: args = (path, why in one line)."""


class VLMDataset(Dataset):
    """A JSON list of records in a layout nanovlm reads (records.to_llava): LLaVA's {"id", "video" and/or "image"
    (a path or a list, as many placeholders), "conversations"}, ShareGPT-style "messages", LLaVA-Video-178K's
    "data_source" folders.

    dataset[(epoch, row, i)] (what RowSampler yields) or dataset[i] (epoch 0) -> a sample dict:
    input_ids (T,), targets (T,) shifted (targets[t] is the id to predict at t), frames (F, 3, S, S)
    uint8, its media in placeholder order: num_frames per video (with fps > 0: its duration x fps, at most
    max_frames), 1 per image, 0 for text; index (JSON index) and row. None if a medium cannot be read. Train mode
    samples frames TSN-style from a generator seeded by (seed, epoch, index); eval mode (and time_instruction,
    whose prompt states the frame times) takes segment centres. Durations come from the records ("duration",
    written by prepare.py), else a probe of the file at construction.
    """

    def __init__(self, json_path, media_root, tokenizer, vision_path, template, num_frames, tokens_per_frame,
                 max_tokens, train=True, seed=0, max_bad_fraction=0.01, fps=0.0, max_frames=32,
                 max_frames_per_row=None, time_instruction=False):
        if template not in TEMPLATES:
            raise ValueError(f"unknown template {template!r}; choose one of {', '.join(TEMPLATES)}")
        if template != "chat" and tokenizer.eos_token is None:
            raise ValueError(f"template {template!r} needs an eos token, and this tokenizer has none")
        if template == "chat" and not tokenizer.chat_template:
            raise ValueError("template 'chat' needs a tokenizer with a chat_template; use 'vicuna_v1' or 'plain'")
        self.media_root, self.tokenizer, self.template = media_root, tokenizer, template
        self.num_frames, self.tokens_per_frame, self.max_tokens = num_frames, tokens_per_frame, max_tokens
        self.fps, self.max_frames, self.max_frames_per_row = fps, max_frames, max_frames_per_row
        self.train, self.seed, self.time_instruction = train, seed, time_instruction
        self.preprocess = load_preprocess(vision_path)
        verbose = int(os.environ.get("RANK", "0")) == 0  # every rank builds the dataset; one reports
        records = read_records(json_path)
        self.records, self.json_indices, self.lengths, self.frame_counts, self.media_frames = [], [], [], [], []
        all_ids, all_labels, offsets = [], [], [0]
        self.num_skipped = self.num_probed = 0
        started = time.perf_counter()
        for json_index, raw in enumerate(records):
            record, problem = check_record(raw)
            if problem is None:
                try:
                    record, counts = self._media_frames(record)
                    ids, labels = encode(record["conversations"], tokenizer, template)
                    problem = self._visual_problem(counts, ids)
                except Exception as e:  # ours, the chat template's own (jinja's raise_exception), a probe's: one record
                    problem = f"{type(e).__name__}: {str(e).partition(chr(10))[0]}"
            if problem is not None:
                self.num_skipped += 1
                if verbose:
                    print(f"warning: {json_path} record {json_index} (id={raw.get('id')!r}): {problem}; skipped",
                          file=sys.stderr)
                continue
            self.records.append(record)
            self.json_indices.append(json_index)
            self.media_frames.append(counts)
            self.lengths.append(min(len(ids) - len(counts) + sum(counts) * tokens_per_frame, max_tokens))
            self.frame_counts.append(sum(counts))
            all_ids += ids
            all_labels += labels
            offsets.append(len(all_ids))
        if verbose and self.num_probed:
            print(f"note: {json_path}: {self.num_probed} videos probed for their duration in "
                  f"{time.perf_counter() - started:.1f}s; `python prepare.py llava` writes durations into the records")
        # flat tensors, not lists of lists: DataLoader workers share them without copy-on-write growth
        self.ids, self.labels = torch.tensor(all_ids, dtype=torch.long), torch.tensor(all_labels, dtype=torch.long)
        self.offsets = torch.tensor(offsets)
        self.sizes, self.weights = [len(self.records)], [1.0]  # what plans an epoch (Mixture: several)
        monitor = BadSampleMonitor(max_bad_fraction, what=f"records of {json_path}")
        monitor.update(num_samples=len(self.records), num_skipped=self.num_skipped)
        if not self.records:
            raise ValueError(f"{json_path}: no usable records ({len(records)} in the file, all skipped; see above)")

    def _media_frames(self, record):
        """(the record, with the time instruction if asked; the frames of each of its media in placeholder order)."""
        media, durations = ordered_media(record, self.media_root), []
        for kind, path, j in media:
            given = record.get("duration")
            given = given if isinstance(given, list) else [given]
            if kind == "image" or not (self.fps > 0 or self.time_instruction):
                durations.append(None)
            elif j < len(given) and isinstance(given[j], (int, float)) and given[j] > 0:
                durations.append(float(given[j]))
            else:
                self.num_probed += 1
                durations.append(probe_duration(path))
        counts = [1 if kind == "image" else frame_count(d, self.fps, self.max_frames) if self.fps > 0 else
                  self.num_frames for (kind, _, _), d in zip(media, durations)]
        if self.time_instruction:
            record = dict(record, conversations=with_time_instruction(record["conversations"], counts, durations))
        return record, counts

    def _visual_problem(self, counts, ids):
        num_visual = sum(counts) * self.tokens_per_frame
        if ids.count(VISUAL_TOKEN) != len(counts):
            return (f"the {self.template} template kept {ids.count(VISUAL_TOKEN)} of the record's {len(counts)} "
                    f"placeholders")
        if num_visual > self.max_tokens:
            return f"its {num_visual} visual tokens alone exceed max_tokens={self.max_tokens}"
        if self.max_frames_per_row is not None and sum(counts) > self.max_frames_per_row:
            return (f"its {sum(counts)} frames exceed max_frames_per_row={self.max_frames_per_row}; raise it, or lower "
                    f"num_frames / max_frames")
        return None

    def __len__(self):
        return len(self.records)

    def media(self, i):
        """Sample i's media in placeholder order: [(kind, path, frames)]."""
        return [(kind, path, n) for (kind, path, _), n in zip(ordered_media(self.records[i], self.media_root),
                                                             self.media_frames[i])]

    def load_frames(self, i, epoch=0):
        """(F, 3, S, S) uint8 frames of sample i, its media in placeholder order; raises UnreadableMedia."""
        jitter = self.train and not self.time_instruction  # TSN; the time instruction states the segment centres
        generator = seeded_generator(self.seed, epoch, self.json_indices[i]) if jitter else None
        frames = []
        for kind, path, count in self.media(i):
            try:
                frames.append(load_image(path, self.preprocess) if kind == "image" else
                              load_video(path, count, self.preprocess, generator, by_time=self.fps > 0))
            except Exception as e:  # any decoder/Pillow failure (incl. decompression bombs) is one bad sample
                first_line = str(e).partition("\n")[0]  # some torchcodec errors append a bug-report form
                raise UnreadableMedia(path, f"{type(e).__name__}: {first_line}") from None
        if not frames:
            return torch.zeros(0, 3, self.preprocess.size, self.preprocess.size, dtype=torch.uint8)
        return frames[0] if len(frames) == 1 else torch.cat(frames)

    def __getitem__(self, key):
        epoch, row, i = key if isinstance(key, tuple) else (0, 0, key)
        try:
            frames = self.load_frames(i, epoch)
        except UnreadableMedia as e:
            path, why = e.args
            _warn_once(path, f"cannot read {path} (record {self.json_indices[i]}): {why}; skipped")
            return None
        num_visual = [n * self.tokens_per_frame for n in self.media_frames[i]]
        start, end = self.offsets[i], self.offsets[i + 1]
        ids, labels = expand_visual(self.ids[start:end], num_visual, self.labels[start:end])
        if len(ids) > self.max_tokens:
            # truncate text from the end, never visual tokens (the model needs all of a clip's tokens)
            is_text = ids != VISUAL_TOKEN
            keep = ~is_text | (is_text.cumsum(0) <= self.max_tokens - sum(num_visual))
            ids, labels = ids[keep], labels[keep]
        targets = torch.cat([labels[1:], labels.new_full((1,), IGNORE)])  # (T,) next-token targets
        return {"input_ids": ids, "targets": targets, "frames": frames, "index": self.json_indices[i], "row": row}

    def prompt(self, i):
        """For generation: (prompt ids with visual tokens expanded, reference answer) of sample i."""
        conversations = self.records[i]["conversations"]
        prompt_ids, answer = encode(conversations, self.tokenizer, self.template, for_generation=True)
        num_visual = [n * self.tokens_per_frame for n in self.media_frames[i]]
        prompt_ids, _ = expand_visual(torch.tensor(prompt_ids), num_visual)
        return prompt_ids, answer


class BadSampleMonitor:
    """Stops a run whose data is broken beyond a few bad files: raises once more than
    max_bad_fraction of the samples seen (after at least min_samples) were bad. The trainer calls
    update(batch["num_samples"], batch["num_skipped"]) for every batch."""

    def __init__(self, max_bad_fraction=0.01, min_samples=100, what="samples"):
        self.max_bad_fraction, self.min_samples, self.what = max_bad_fraction, min_samples, what
        self.num_bad = self.num_seen = 0

    def update(self, num_samples, num_skipped):
        self.num_bad += num_skipped
        self.num_seen += num_samples + num_skipped
        if self.num_seen >= self.min_samples and self.num_bad > self.max_bad_fraction * self.num_seen:
            raise RuntimeError(f"{self.num_bad} of {self.num_seen} {self.what} were bad, more than max_bad_fraction="
                               f"{self.max_bad_fraction}: fix the data (see the warnings) or raise max_bad_fraction")


# -----------------------------------------------------------------------------
# several datasets in one run

DATASET_KEYS = {"name": str, "train_data": str, "val_data": str, "media_root": str, "weight": (int, float),
                "num_frames": int, "fps": (int, float), "max_frames": int, "eval_label_set": bool}


def dataset_entries(c):
    """The run's datasets, each a dict with every key of DATASET_KEYS: c.datasets (keys left out take the run's
    settings; val_data "" = none), or the one dataset of c.train_data / c.val_data / c.media_root, named "".
    Raises ValueError (one line, naming the entry and key) for an entry that is wrong."""
    inherited = {key: getattr(c, key) for key in ("num_frames", "fps", "max_frames", "eval_label_set")}
    if not c.datasets:
        return [dict(name="", train_data=c.train_data, val_data=c.val_data, media_root=c.media_root, weight=1.0,
                     **inherited)]
    entries = []
    for k, entry in enumerate(c.datasets):
        where = f"datasets[{k}]" + (f" ({entry['name']!r})" if isinstance(entry, dict) and "name" in entry else "")
        if not isinstance(entry, dict):
            raise ValueError(f"{where} is a {type(entry).__name__}; expected dict(name=..., train_data=..., "
                             f"val_data=..., media_root=..., weight=...)")
        for key, value in entry.items():
            if key not in DATASET_KEYS:
                close = difflib.get_close_matches(str(key), DATASET_KEYS, n=1)
                raise ValueError(f"{where}: unknown key {key!r}; " + (f"did you mean {close[0]!r}?" if close else
                                                                      f"valid keys: {', '.join(DATASET_KEYS)}"))
            if not isinstance(value, DATASET_KEYS[key]) or isinstance(value, bool) != (DATASET_KEYS[key] is bool):
                raise ValueError(f"{where}: {key}={value!r} is a {type(value).__name__}; expected "
                                 f"{getattr(DATASET_KEYS[key], '__name__', 'a number')}")
        missing = [key for key in ("name", "train_data", "media_root") if key not in entry]
        if missing:
            raise ValueError(f"{where} lacks {missing[0]!r} (needed: name, train_data, media_root)")
        if not entry["name"] or entry["name"] in [e["name"] for e in entries]:
            raise ValueError(f"{where}: name {entry['name']!r} is empty or taken; each dataset needs its own name "
                             f"(it names its validation metrics)")
        if entry.get("weight", 1.0) <= 0:
            raise ValueError(f"{where}: weight={entry['weight']!r} must be above 0")
        entries.append({"val_data": "", "weight": 1.0, **inherited, **entry})
    return entries


def make_dataset(entry, json_path, train, c, tokenizer, tokens_per_frame):
    """A VLMDataset of one entry of dataset_entries, with the run's settings (c) and the entry's sampling."""
    return VLMDataset(json_path, entry["media_root"], tokenizer, c.vision_path, c.template, entry["num_frames"],
                      tokens_per_frame, c.max_tokens, train=train, seed=c.seed, max_bad_fraction=c.max_bad_fraction,
                      fps=entry["fps"], max_frames=entry["max_frames"], max_frames_per_row=c.max_frames_per_row,
                      time_instruction=c.time_instruction)


class Mixture(Dataset):
    """Several datasets as one: sample i of dataset d is sample offsets[d] + i; an epoch draws them by weight
    (draw_order). Everything RowSampler, the loaders and collate read of a dataset."""

    def __init__(self, datasets, weights):
        self.datasets, self.weights, self.sizes = datasets, list(weights), [len(d) for d in datasets]
        self.offsets = [sum(self.sizes[:d]) for d in range(len(datasets))]
        self.lengths = [n for d in datasets for n in d.lengths]
        self.frame_counts = [n for d in datasets for n in d.frame_counts]
        self.max_tokens, self.preprocess, self.tokenizer = datasets[0].max_tokens, datasets[0].preprocess, \
            datasets[0].tokenizer

    def __len__(self):
        return sum(self.sizes)

    def __getitem__(self, key):
        epoch, row, i = key
        d = bisect.bisect_right(self.offsets, i) - 1
        return self.datasets[d][(epoch, row, i - self.offsets[d])]


# -----------------------------------------------------------------------------
# packing, distributed rows, collate

def draw_order(sizes, weights, seed, epoch):
    """The samples of an epoch, in order, from datasets of these sizes (their samples numbered one after the other)
    drawn by weight: an epoch holds sum(sizes) samples, dataset d about weights[d] / sum(weights) of them. A dataset
    whose share is its size gives each sample once; another walks through its own shuffles, continued across
    epochs (so an under-weighted one sees every sample before any twice). Then all are shuffled by (seed, epoch).
    One dataset: a plain shuffle. Deterministic in (seed, epoch), so ranks and resumes agree."""
    total, drawn, first = sum(sizes), [], 0
    for d, (n, weight) in enumerate(zip(sizes, weights)):
        k = n if len(sizes) == 1 else max(1, round(total * weight / sum(weights)))
        if k == n:
            picks = torch.arange(n)
        else:
            start = epoch * k  # position in dataset d's endless stream of shuffles
            picks = torch.cat([torch.randperm(n, generator=seeded_generator(seed, "mixture", d, p))
                               for p in range(start // n, (start + k - 1) // n + 1)])[start % n:start % n + k]
        drawn.append(picks + first)
        first += n
    order = torch.cat(drawn)
    return order[torch.randperm(len(order), generator=seeded_generator(seed, epoch))].tolist()


def plan_rows(lengths, frames, max_tokens, max_frames_per_row, seed, epoch, packing=True, shuffle=True, window=8,
              sizes=None, weights=None):
    """Group sample indices into rows. The order is shuffled by (seed, epoch), drawn by weight from several
    datasets if sizes/weights are given (draw_order); with packing, each sample goes into the first of the last
    `window` open rows where it fits (tokens and frames), else opens a new row. Without packing every row is one
    sample. Deterministic."""
    order = range(len(lengths))
    if shuffle:
        order = draw_order(sizes or [len(lengths)], weights or [1.0], seed, epoch)
    if not packing:
        return [[i] for i in order]
    rows, open_rows = [], []  # open row: [indices, tokens, frames]
    for i in order:
        if lengths[i] > max_tokens or frames[i] > max_frames_per_row:
            raise ValueError(f"sample {i} has {lengths[i]} tokens and {frames[i]} frames, over a row's "
                             f"max_tokens={max_tokens} / max_frames_per_row={max_frames_per_row}; raise them")
        for row in open_rows:
            if row[1] + lengths[i] <= max_tokens and row[2] + frames[i] <= max_frames_per_row:
                row[0].append(i)
                row[1] += lengths[i]
                row[2] += frames[i]
                break
        else:
            open_rows.append([[i], lengths[i], frames[i]])
            if len(open_rows) > window:
                rows.append(open_rows.pop(0)[0])
    return rows + [row[0] for row in open_rows]


class RowSampler(Sampler):
    """Yields one micro-batch of this rank at a time: a list of (epoch, row_in_batch, sample) keys.

    An optimizer step consumes rows_per_step consecutive rows of the epoch's plan (the global batch: all ranks and
    micro-steps together, world_size * micro_batch if not given); each micro-step consumes world_size *
    micro_batch of them, rank r taking rows [r*micro_batch, (r+1)*micro_batch) of those. So the rows a step
    consumes do not depend on the number of ranks: a run resumed on another number neither skips nor repeats a
    sample. An epoch's last rows that do not fill a whole step are dropped (every rank must run the same number
    of steps); the shuffle puts other samples there next epoch. Resume: set_epoch(epoch, start_row=rows
    consumed so far)."""

    def __init__(self, dataset, micro_batch, max_frames_per_row, rank=0, world_size=1, seed=0, packing=True,
                 shuffle=True, max_tokens=None, rows_per_step=None):
        self.lengths, self.frame_counts = dataset.lengths, dataset.frame_counts
        self.sizes, self.weights = dataset.sizes, dataset.weights
        self.max_tokens = max_tokens or dataset.max_tokens  # tokens per row
        if max(self.frame_counts) > max_frames_per_row:
            raise ValueError(f"a sample has {max(self.frame_counts)} frames but max_frames_per_row="
                             f"{max_frames_per_row}; set max_frames_per_row >= num_frames")
        self.micro_batch, self.max_frames_per_row = micro_batch, max_frames_per_row
        self.rank, self.world_size = rank, world_size
        self.rows_per_step = rows_per_step or world_size * micro_batch
        self.seed, self.packing, self.shuffle = seed, packing, shuffle
        self.epoch, self.start_row, self._plan = 0, 0, None

    def set_epoch(self, epoch, start_row=0):
        self.epoch, self.start_row = epoch, start_row

    def rows(self):
        if self._plan is None or self._plan[0] != self.epoch:
            rows = plan_rows(self.lengths, self.frame_counts, self.max_tokens, self.max_frames_per_row, self.seed,
                             self.epoch, self.packing, self.shuffle, sizes=self.sizes, weights=self.weights)
            self._plan = (self.epoch, rows)
        return self._plan[1]

    def __len__(self):  # micro-steps left in the epoch, whole optimizer steps only
        steps = max(0, len(self.rows()) - self.start_row) // self.rows_per_step
        return steps * self.rows_per_step // (self.world_size * self.micro_batch)

    def __iter__(self):
        rows, per_micro_step = self.rows(), self.world_size * self.micro_batch
        for k in range(len(self)):
            first = self.start_row + k * per_micro_step + self.rank * self.micro_batch
            yield [(self.epoch, r, i) for r, row in enumerate(rows[first:first + self.micro_batch]) for i in row]


def collate(samples, image_size, pad_id=0, pad_to_multiple=8):
    """Samples (None = bad) -> a batch: input_ids/targets/position_ids/document_ids (B, T), frames
    (N, 3, S, S) in placeholder order (row-major), num_skipped, num_samples. Padding has pad_id,
    target IGNORE, position 0, document -1; any valid pad_id works since padding is masked."""
    kept = [s for s in samples if s is not None]
    rows = [[] for _ in range(max((s["row"] for s in kept), default=0) + 1)]
    for sample in kept:
        rows[sample["row"]].append(sample)
    longest = max(sum(len(s["input_ids"]) for s in row) for row in rows)
    T = max(1, -(-longest // pad_to_multiple)) * pad_to_multiple
    # one buffer, so the four index tensors cross from the worker as one shared-memory segment
    input_ids, targets, position_ids, document_ids = torch.empty((4, len(rows), T), dtype=torch.long)  # each (B, T)
    input_ids.fill_(pad_id)
    targets.fill_(IGNORE)
    position_ids.zero_()
    document_ids.fill_(-1)
    for r, row in enumerate(rows):
        t = 0
        for document, sample in enumerate(row):
            n = len(sample["input_ids"])
            input_ids[r, t:t + n] = sample["input_ids"]
            targets[r, t:t + n] = sample["targets"]
            position_ids[r, t:t + n] = torch.arange(n)
            document_ids[r, t:t + n] = document
            t += n
    frames = [s["frames"] for row in rows for s in row] or [torch.zeros(0, 3, image_size, image_size,
                                                                         dtype=torch.uint8)]
    return {"input_ids": input_ids, "targets": targets, "position_ids": position_ids, "document_ids": document_ids,
            "frames": torch.cat(frames), "num_skipped": len(samples) - len(kept), "num_samples": len(kept)}


def return_freed_memory(*_):
    """Have glibc return freed blocks of 64 KiB and more to the OS at once. By default it raises that threshold
    after the first such free, and then decoded frames of ever-changing sizes fragment the heap for good: a demo
    worker grew by 20 MB a step, to 12 GB after 660 steps, until the OOM killer ended the run. A DataLoader
    worker_init_fn; on a libc without mallopt (macOS, musl) it does nothing."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD = 64 KiB
    except (OSError, AttributeError):
        pass


def make_loader(dataset, sampler, num_workers=2, pad_to_multiple=8, pin_memory=False):
    """A DataLoader wired to a RowSampler. Workers persist, so decoders never start in the parent. pin_memory
    (on CUDA): batches land in page-locked memory, so the trainer's non_blocking copies really overlap."""
    collate_fn = functools.partial(collate, image_size=dataset.preprocess.size,
                                   pad_id=dataset.tokenizer.pad_token_id or 0, pad_to_multiple=pad_to_multiple)
    # a generator of its own: the workers' seeds never come from, nor advance, the trainer's global RNG (which a
    # resumed run restores, and LoRA's dropout draws from)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, persistent_workers=num_workers > 0,
                      collate_fn=collate_fn, worker_init_fn=return_freed_memory, pin_memory=pin_memory,
                      generator=torch.Generator().manual_seed(0))


class TrainBatches:
    """Endless training micro-batches of this rank, epoch after epoch.

    position = (epoch, rows consumed in it by all ranks) after the batches returned so far: save it
    in a checkpoint (at a step boundary) and pass it back as `start` to resume exactly there, on any
    number of ranks (the DataLoader prefetches ahead, so the sampler's own progress would overcount)."""

    def __init__(self, dataset, micro_batch, rank, world_size, max_tokens, max_frames_per_row, packing, seed,
                 num_workers=2, start=(0, 0), pin_memory=False, rows_per_step=None):
        self.sampler = RowSampler(dataset, micro_batch, max_frames_per_row, rank, world_size, seed, packing,
                                  max_tokens=max_tokens, rows_per_step=rows_per_step)
        self.loader = make_loader(dataset, self.sampler, num_workers, pin_memory=pin_memory)
        self.rows_per_micro_step = world_size * micro_batch
        self.position, self._batches = tuple(start), None

    def __iter__(self):
        return self

    def __next__(self):
        epoch, row = self.position
        if self._batches is None:
            self.sampler.set_epoch(epoch, row)
            if len(self.sampler.rows()) < self.sampler.rows_per_step:
                raise ValueError(f"{len(self.sampler.rows())} rows per epoch, fewer than the {self.sampler.rows_per_step}"
                                 f" of one step (global_batch_size): use more data or smaller batches")
            self._batches = iter(self.loader)
        batch = next(self._batches, None)
        if batch is None:  # epoch done
            self.position, self._batches = (epoch + 1, 0), None
            return next(self)
        self.position = (epoch, row + self.rows_per_micro_step)
        return batch


class _WithPrompts(Dataset):
    """Validation samples: the training sample plus its generation prompt and reference answer."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        sample = self.dataset[key]
        if sample is not None:
            sample["prompt"], sample["answer"] = self.dataset.prompt(key[2])
        return sample


def _collate_with_prompts(samples, **kwargs):
    batch = collate(samples, **kwargs)
    kept = [s for s in samples if s is not None]  # one sample per row, in row order, as the frames are
    batch.update(prompts=[s["prompt"] for s in kept], answers=[s["answer"] for s in kept],
                 prompt_frames=batch["frames"])
    return batch


def eval_batches(dataset, batch_size, rank, world_size, max_samples=0, *, num_workers=0):
    """Validation batches of this rank: the first max_samples samples (0 = all), in order, one per
    row, rank r taking every world_size-th. Every rank runs the same number of batches (the forwards
    are collective under FSDP), so a rank short of samples gets a smaller last batch, or an empty one,
    and every sample is evaluated whatever the number of ranks. A batch is a training batch (for the
    loss) plus prompts, prompt_frames and answers (for generation)."""
    count = min(max_samples or len(dataset), len(dataset))
    mine = list(range(rank, count, world_size))
    per_rank = -(-count // world_size)
    keys = [[(0, r, i) for r, i in enumerate(mine[k:k + batch_size])] for k in range(0, per_rank, batch_size)]
    collate_fn = functools.partial(_collate_with_prompts, image_size=dataset.preprocess.size,
                                   pad_id=dataset.tokenizer.pad_token_id or 0)
    return DataLoader(_WithPrompts(dataset), batch_sampler=keys, num_workers=num_workers, collate_fn=collate_fn,
                      worker_init_fn=return_freed_memory, generator=torch.Generator().manual_seed(0))


def normalize_answer(text):
    """For exact-match accuracy: lowercase, punctuation (brackets too) dropped, whitespace collapsed."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def load_tokenizer(path):
    """The LM's tokenizer, from its HF directory."""
    return AutoTokenizer.from_pretrained(path)


# -----------------------------------------------------------------------------
# python -m nanovlm.data --bench: loader throughput against raw torchcodec decoding

class _RawDecode(Dataset):
    """The floor: decode the same frames (same indices or times) with torchcodec, and images with Pillow, and
    nothing else: no resize, no tokens, no collate."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        from PIL import Image
        from torchcodec.decoders import VideoDecoder
        epoch, _, i = key
        generator, decoded = seeded_generator(self.dataset.seed, epoch, self.dataset.json_indices[i]), []
        for kind, path, count in self.dataset.media(i):
            if kind == "image":
                with Image.open(path) as image:
                    decoded.append(torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8))
            else:
                by_time = self.dataset.fps > 0  # the exact index then, as load_video takes
                decoder = VideoDecoder(path, seek_mode="exact" if by_time else "approximate", num_ffmpeg_threads=1)
                decoded.append(sample_frames(decoder, count, generator, by_time))
        return decoded


def _epoch_samples_per_second(loader, sampler, epoch):
    sampler.set_epoch(epoch)
    start, samples = time.perf_counter(), 0
    for batch in loader:
        raw = isinstance(batch, list)  # _RawDecode batches are lists of samples, each a list of uint8 tensors
        samples += len(batch) if raw else batch["num_samples"]
        for frames in [t for sample in batch for t in sample] if raw else [batch["frames"]]:
            # touch every 4 KiB page (shared memory is paged in on first read, which a trainer pays too), through
            # the storage: frames decoded channels-last would be copied by a reshape (it made raw decoding look slow)
            torch.empty(0, dtype=torch.uint8).set_(frames.untyped_storage())[::4096].sum()
    return samples / (time.perf_counter() - start)


def loader_speed(dataset, batch, workers, epochs):
    """Median samples/s of the full pipeline and of raw decoding of the same frames, over `epochs` timed passes of
    each, interleaved so that both see the same machine load. One sample per row, `batch` rows per batch."""
    sampler = RowSampler(dataset, batch, max_frames_per_row=max(dataset.frame_counts), packing=False)
    loaders = {"full": make_loader(dataset, sampler, workers),
               "raw": DataLoader(_RawDecode(dataset), batch_sampler=sampler, num_workers=workers,
                                 persistent_workers=workers > 0, collate_fn=list)}
    rates = {name: [] for name in loaders}
    for epoch in range(epochs + 1):
        for name, loader in loaders.items():
            rate = _epoch_samples_per_second(loader, sampler, epoch)
            if epoch > 0:  # epoch 0 starts the workers
                rates[name].append(rate)
    return tuple(sorted(rates[name])[len(rates[name]) // 2] for name in ("full", "raw"))  # medians


def mixed_records(records, media_root, image_dir):
    """Mixed media from video records, for the bench: of every three, one stays a clip, one becomes its clip's
    first frame as a JPEG image (written to image_dir), one a sample of two clips (its own and the previous)."""
    from PIL import Image
    from torchcodec.decoders import VideoDecoder
    mixed = []
    for k, record in enumerate(records):
        conversations = record["conversations"]
        if k % 3 == 1:
            frame = VideoDecoder(os.path.join(media_root, record["video"]))[0]  # (3, H, W) uint8
            path = os.path.join(image_dir, f"{k}.jpg")
            Image.fromarray(frame.permute(1, 2, 0).numpy()).save(path, quality=90)
            mixed.append({"id": record["id"], "image": path, "conversations": [
                dict(turn, value=turn["value"].replace("<video>", "<image>")) for turn in conversations]})
        elif k % 3 == 2:
            mixed.append({"id": record["id"], "video": [records[k - 1]["video"], record["video"]], "conversations": [
                dict(turn, value=turn["value"].replace("<video>", "<video>\n<video>")) for turn in conversations]})
        else:
            mixed.append(record)
    return mixed


def bench():
    parser = argparse.ArgumentParser(description="data loader throughput vs raw torchcodec decoding")
    parser.add_argument("--bench", action="store_true", required=True)
    parser.add_argument("--data", required=True, help="JSON of records (their media are decoded)")
    parser.add_argument("--media-root", required=True)
    parser.add_argument("--vision", required=True, help="HF vision tower dir (for size and mean/std)")
    parser.add_argument("--tokenizer", required=True, help="HF tokenizer dir")
    parser.add_argument("--template", default="plain", choices=TEMPLATES)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--mixed", action="store_true", help="turn a video JSON into clips, images and 2-clip "
                        "samples (mixed_records)")
    parser.add_argument("--batch", type=int, default=4, help="rows per batch, one sample per row")
    parser.add_argument("--epochs", type=int, default=5, help="timed passes of each loader, interleaved")
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.tokenizer)
    with tempfile.TemporaryDirectory() as scratch:
        data = args.data
        if args.mixed:
            data = os.path.join(scratch, "mixed.json")
            with open(data, "w") as f:
                json.dump(mixed_records(read_records(args.data), args.media_root, scratch), f)
        dataset = VLMDataset(data, args.media_root, tokenizer, args.vision, args.template, args.frames,
                             tokens_per_frame=1, max_tokens=1 << 20, train=True)
        full, raw = loader_speed(dataset, args.batch, args.workers, args.epochs)
    kinds = {kind for i in range(len(dataset)) for kind, _, _ in dataset.media(i)}
    print(f"{len(dataset)} samples ({', '.join(sorted(kinds))}; {sum(dataset.frame_counts)} frames), {args.frames} "
          f"frames a clip -> {dataset.preprocess.size}px, {args.workers} workers")
    print(f"raw decode:    {raw:8.1f} samples/s")
    print(f"full pipeline: {full:8.1f} samples/s  ({full / raw:.2f}x raw)")


if __name__ == "__main__":
    bench()
