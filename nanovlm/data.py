"""Training data: LLaVA-format JSON -> tokens with per-turn labels -> packed, resumable batches.

What is notable:
- Labels come from explicit spans. Each template turns a conversation into (text, supervised)
  segments; the segments are tokenized separately and concatenated, so a label can never be off
  by a few tokens the way "tokenize again and subtract lengths" is when merges cross a boundary.
  For `chat` the spans are found by rendering prefixes of the conversation with the tokenizer's own
  chat template: the assistant's completion is what rendering one more turn adds after the
  generation prompt, end-of-turn token included, trailing whitespace not.
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
import ctypes
import functools
import hashlib
import json
import os
import re
import sys
import time

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from transformers import AutoTokenizer

from nanovlm.media import frame_indices, load_image, load_preprocess, load_video
from nanovlm.model import IGNORE, VISUAL_TOKEN

PLACEHOLDER = re.compile(r"<video>|<image>")
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
TEMPLATES = ("plain", "chat", "vicuna_v1")

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
# records and conversations

def validate_record(record):
    """Return why a LLaVA record is malformed, or None if it is fine."""
    if not isinstance(record, dict):
        return "record is not a JSON object"
    media = [key for key in ("video", "image") if key in record]
    if len(media) > 1:
        return "has both 'video' and 'image'; a sample holds at most one media item"
    if media and not (isinstance(record[media[0]], str) and record[media[0]]):
        return f"'{media[0]}' must be a non-empty path string"
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        return "'conversations' must be a non-empty list"
    if not all(isinstance(t, dict) and isinstance(t.get("from"), str) and isinstance(t.get("value"), str)
               for t in turns):
        return "every turn of 'conversations' must be {'from': str, 'value': str}"
    start = 1 if turns[0]["from"] == "system" else 0  # an optional system prompt comes first
    if start and PLACEHOLDER.search(turns[0]["value"]):
        return "the system turn contains a <video>/<image> placeholder"
    if len(turns) == start or (len(turns) - start) % 2:
        return "the conversation must alternate human/gpt turns and end with a gpt turn"
    num_placeholders = 0
    for k in range(start, len(turns)):
        sender, value = turns[k]["from"], turns[k]["value"]
        expected = "user" if (k - start) % 2 == 0 else "assistant"
        if ROLES.get(sender) != expected:
            return (f"conversations[{k}] is from {sender!r}, expected "
                    f"{'human' if expected == 'user' else 'gpt'} (turns alternate, starting with human)")
        if expected == "assistant" and PLACEHOLDER.search(value):
            return f"conversations[{k}] (gpt) contains a <video>/<image> placeholder"
        if expected == "assistant" and not value.strip():
            return f"conversations[{k}] (gpt) is empty"
        num_placeholders += len(PLACEHOLDER.findall(value))
    if media and num_placeholders != 1:
        return f"has '{media[0]}' but {num_placeholders} <video>/<image> placeholders; expected exactly 1"
    if not media and num_placeholders:
        return "has a <video>/<image> placeholder but no 'video' or 'image' key"
    return None


@functools.cache  # asked once per tokenizer, not once per record
def _adds_bos(tokenizer):
    """Whether the LM was trained with a BOS it gets from its tokenizer (Llama yes, Qwen no)."""
    return tokenizer.bos_token_id is not None and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]


def _plain(messages, tokenizer, add_generation_prompt):
    """LLaVA stage-1 pretraining: [bos] + visual tokens + answer + eos; the question is dropped.
    A text-only record becomes [bos] + answer + eos: plain language modelling on the answer."""
    turns = [m for m in messages if m["role"] != "system"]
    if len(turns) != (1 if add_generation_prompt else 2):
        raise ValueError(f"the plain template takes one human and one gpt turn, got {len(turns)} turns")
    prompt = (tokenizer.bos_token if _adds_bos(tokenizer) else "") + "".join(PLACEHOLDER.findall(turns[0]["content"]))
    answer = [] if add_generation_prompt else [(turns[1]["content"] + tokenizer.eos_token, True)]
    return [(prompt, False)] + answer


def _vicuna_v1(messages, tokenizer, add_generation_prompt):
    """LLaVA's conv_vicuna_v1: "{system} USER: {q} ASSISTANT: {a}</s>USER: ..." with the tokenizer's
    eos as "</s>" (it is "</s>" for Vicuna/Llama). The answer segment keeps its leading space, so it
    tokenizes the way it does inside the sentence."""
    system = messages[0]["content"] if messages[0]["role"] == "system" else VICUNA_SYSTEM
    text = (tokenizer.bos_token if _adds_bos(tokenizer) else "") + system + " "
    segments = []
    for message in messages:
        if message["role"] == "user":
            text += "USER: " + message["content"] + " ASSISTANT:"
        elif message["role"] == "assistant":
            segments += [(text, False), (" " + message["content"] + tokenizer.eos_token, True)]
            text = ""
    return segments + [(text, False)]


def _chat(messages, tokenizer, add_generation_prompt):
    """The tokenizer's own chat template. Supervised: each assistant completion, i.e. the tokens that
    rendering the turn adds after the generation prompt, up to the end-of-turn token (<|im_end|>,
    <|end|>, <|eot_id|>). The turn is cut where the tokens of "conversation ends here" and
    "conversation goes on" diverge, so an end-of-conversation token (Phi-3 appends eos) or the
    newline before the next turn is not taken as part of the answer."""
    def render(msgs, generation_prompt=False):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)

    full = render(messages, add_generation_prompt)
    segments, start = [], 0
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(messages[:k], generation_prompt=True)
        ends = render(messages[:k + 1])
        goes_on = render(messages[:k + 1] + [{"role": "user", "content": "x"}])
        if not (ends.startswith(before) and goes_on.startswith(before) and full.startswith(before)):
            raise RuntimeError("the tokenizer's chat template does not render conversations prefix by prefix "
                               "(it rewrites earlier turns), so assistant spans cannot be found; "
                               "use template='vicuna_v1' or another LM")
        ended = tokenizer(ends[len(before):], add_special_tokens=False, return_offsets_mapping=True)
        going = tokenizer(goes_on[len(before):], add_special_tokens=False)["input_ids"]
        n = len(os.path.commonprefix([ended["input_ids"], going]))
        while n and not tokenizer.decode(ended["input_ids"][n - 1:n]).strip():
            n -= 1  # whitespace after the end-of-turn token is the template's, not the model's to say
        end = len(before) + (ended["offset_mapping"][n - 1][1] if n else 0)
        if not (full.startswith(ends[:end]) and message["content"].strip() in full[len(before):end]):
            raise RuntimeError(f"cannot find assistant turn {k} in the rendered chat template; "
                               "use template='vicuna_v1' or another LM")
        segments += [(full[start:len(before)], False), (full[len(before):end], True)]
        start = end
    return segments + [(full[start:], False)]


def _tokenize(segments, tokenizer):
    """(text, supervised) segments -> (ids, labels). A placeholder becomes one VISUAL_TOKEN."""
    pieces = []  # (text, supervised), text None for a placeholder
    for text, supervised in segments:
        for j, part in enumerate(PLACEHOLDER.split(text)):
            if j:
                pieces.append((None, False))
            if part:
                pieces.append((part, supervised))
    texts = [text for text, _ in pieces if text is not None]
    encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    ids, labels = [], []
    for text, supervised in pieces:
        piece = [VISUAL_TOKEN] if text is None else next(encoded)
        ids += piece
        labels += piece if supervised else [IGNORE] * len(piece)
    return ids, labels


def encode(conversations, tokenizer, template, for_generation=False):
    """A LLaVA conversation -> (ids, labels), labels unshifted with IGNORE where not supervised.
    With for_generation=True -> (prompt_ids, answer): everything up to where the last gpt answer
    begins, and that answer's text. A placeholder is one VISUAL_TOKEN in ids (see expand_visual).
    Raises ValueError if the template cannot encode this conversation."""
    messages = [{"role": ROLES[turn["from"]], "content": turn["value"]} for turn in conversations]
    render = {"plain": _plain, "chat": _chat, "vicuna_v1": _vicuna_v1}[template]
    if not for_generation:
        return _tokenize(render(messages, tokenizer, False), tokenizer)
    prompt_ids, _ = _tokenize(render(messages[:-1], tokenizer, True), tokenizer)
    return prompt_ids, messages[-1]["content"]


def expand_visual(ids, num_visual, labels=None):
    """Replace the one VISUAL_TOKEN of a 1-D ids tensor by num_visual of them, and the matching
    position of labels (if given) by num_visual IGNOREs. Returns (ids, labels)."""
    where = (ids == VISUAL_TOKEN).nonzero()
    if len(where) == 0:
        return ids, labels
    p = int(where[0, 0])
    ids = torch.cat([ids[:p], ids.new_full((num_visual,), VISUAL_TOKEN), ids[p + 1:]])
    if labels is not None:
        labels = torch.cat([labels[:p], labels.new_full((num_visual,), IGNORE), labels[p + 1:]])
    return ids, labels


# -----------------------------------------------------------------------------
# the dataset

class VLMDataset(Dataset):
    """A LLaVA-format JSON list of {"id", "video" or "image" (optional), "conversations"}.

    dataset[(epoch, row, i)] (what RowSampler yields) or dataset[i] (epoch 0) -> a sample dict:
    input_ids (T,), targets (T,) shifted (targets[t] is the id to predict at t), frames (F, 3, S, S)
    uint8 with F = num_frames for a video, 1 for an image, 0 for text; index (JSON index) and row.
    None if the media cannot be read. Train mode samples frames TSN-style from a generator seeded
    by (seed, epoch, index); eval mode takes segment centres.
    """

    def __init__(self, json_path, media_root, tokenizer, vision_path, template, num_frames, tokens_per_frame,
                 max_tokens, train=True, seed=0, max_bad_fraction=0.01):
        if template not in TEMPLATES:
            raise ValueError(f"unknown template {template!r}; choose one of {', '.join(TEMPLATES)}")
        if template != "chat" and tokenizer.eos_token is None:
            raise ValueError(f"template {template!r} needs an eos token, and this tokenizer has none")
        if template == "chat" and not tokenizer.chat_template:
            raise ValueError("template 'chat' needs a tokenizer with a chat_template; use 'vicuna_v1' or 'plain'")
        self.media_root, self.tokenizer, self.template = media_root, tokenizer, template
        self.num_frames, self.tokens_per_frame, self.max_tokens = num_frames, tokens_per_frame, max_tokens
        self.train, self.seed = train, seed
        self.preprocess = load_preprocess(vision_path)
        verbose = int(os.environ.get("RANK", "0")) == 0  # every rank builds the dataset; one reports
        records = _read_records(json_path)
        self.records, self.json_indices, self.lengths, self.frame_counts = [], [], [], []
        all_ids, all_labels, offsets = [], [], [0]
        self.num_skipped = 0
        for json_index, record in enumerate(records):
            problem = validate_record(record)
            if problem is None:
                try:
                    ids, labels = encode(record["conversations"], tokenizer, template)
                    problem = self._visual_problem(record, ids)
                except Exception as e:  # ours, or the chat template's own (jinja's raise_exception): one record
                    problem = f"{type(e).__name__}: {e}"
            if problem is not None:
                self.num_skipped += 1
                if verbose:
                    print(f"warning: {json_path} record {json_index} (id={record.get('id')!r}): {problem}; skipped",
                          file=sys.stderr)
                continue
            num_visual = self._num_visual(record)
            self.records.append(record)
            self.json_indices.append(json_index)
            self.lengths.append(min(len(ids) - (num_visual > 0) + num_visual, max_tokens))
            self.frame_counts.append(num_visual // tokens_per_frame)
            all_ids += ids
            all_labels += labels
            offsets.append(len(all_ids))
        # flat tensors, not lists of lists: DataLoader workers share them without copy-on-write growth
        self.ids, self.labels = torch.tensor(all_ids, dtype=torch.long), torch.tensor(all_labels, dtype=torch.long)
        self.offsets = torch.tensor(offsets)
        monitor = BadSampleMonitor(max_bad_fraction, what=f"records of {json_path}")
        monitor.update(num_samples=len(self.records), num_skipped=self.num_skipped)
        if not self.records:
            raise ValueError(f"{json_path}: no usable records ({len(records)} in the file, all skipped; see above)")

    def _num_visual(self, record):
        frames = self.num_frames if "video" in record else 1 if "image" in record else 0
        return frames * self.tokens_per_frame

    def _visual_problem(self, record, ids):
        num_visual = self._num_visual(record)
        if ids.count(VISUAL_TOKEN) != (num_visual > 0):
            return f"the {self.template} template kept {ids.count(VISUAL_TOKEN)} of the record's placeholders"
        if num_visual > self.max_tokens:
            return f"its {num_visual} visual tokens alone exceed max_tokens={self.max_tokens}"
        return None

    def __len__(self):
        return len(self.records)

    def media_path(self, i):
        record = self.records[i]
        name = record.get("video") or record.get("image")
        return None if name is None else os.path.join(self.media_root, name)

    def load_frames(self, i, epoch=0):
        """(F, 3, S, S) float frames of sample i; raises if its media cannot be read."""
        record, path = self.records[i], self.media_path(i)
        if "image" in record:
            return load_image(path, self.preprocess)
        if "video" in record:
            generator = seeded_generator(self.seed, epoch, self.json_indices[i]) if self.train else None
            return load_video(path, self.num_frames, self.preprocess, generator)
        return torch.zeros(0, 3, self.preprocess.size, self.preprocess.size, dtype=torch.uint8)

    def __getitem__(self, key):
        epoch, row, i = key if isinstance(key, tuple) else (0, 0, key)
        try:
            frames = self.load_frames(i, epoch)
        except Exception as e:  # any decoder/Pillow failure (incl. decompression bombs) is one bad sample
            first_line = str(e).partition("\n")[0]  # some torchcodec errors append a bug-report form
            _warn_once(self.media_path(i), f"cannot read {self.media_path(i)} (record {self.json_indices[i]}): "
                         f"{type(e).__name__}: {first_line}; skipped")
            return None
        num_visual = self._num_visual(self.records[i])
        start, end = self.offsets[i], self.offsets[i + 1]
        ids, labels = expand_visual(self.ids[start:end], num_visual, self.labels[start:end])
        if len(ids) > self.max_tokens:
            # truncate text from the end, never visual tokens (the model needs all of a clip's tokens)
            is_text = ids != VISUAL_TOKEN
            keep = ~is_text | (is_text.cumsum(0) <= self.max_tokens - num_visual)
            ids, labels = ids[keep], labels[keep]
        targets = torch.cat([labels[1:], labels.new_full((1,), IGNORE)])  # (T,) next-token targets
        return {"input_ids": ids, "targets": targets, "frames": frames, "index": self.json_indices[i], "row": row}

    def prompt(self, i):
        """For generation: (prompt ids with visual tokens expanded, reference answer) of sample i."""
        conversations = self.records[i]["conversations"]
        prompt_ids, answer = encode(conversations, self.tokenizer, self.template, for_generation=True)
        prompt_ids, _ = expand_visual(torch.tensor(prompt_ids), self._num_visual(self.records[i]))
        return prompt_ids, answer


def _read_records(json_path):
    try:
        with open(json_path) as f:
            records = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {json_path}: {e}") from e
    if not isinstance(records, list):
        raise ValueError(f"{json_path}: expected a JSON list of records, got a {type(records).__name__}")
    for json_index, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(f"{json_path} record {json_index}: expected an object, got {type(record).__name__}; "
                             "the file must be a JSON list of LLaVA records")
    return records


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
# packing, distributed rows, collate

def plan_rows(lengths, frames, max_tokens, max_frames_per_row, seed, epoch, packing=True, shuffle=True, window=8):
    """Group sample indices into rows. The order is shuffled by (seed, epoch); with packing, each
    sample goes into the first of the last `window` open rows where it fits (tokens and frames),
    else opens a new row. Without packing every row is one sample. Deterministic."""
    order = range(len(lengths))
    if shuffle:
        order = torch.randperm(len(lengths), generator=seeded_generator(seed, epoch)).tolist()
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
                             self.epoch, self.packing, self.shuffle)
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
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, persistent_workers=num_workers > 0,
                      collate_fn=collate_fn, worker_init_fn=return_freed_memory, pin_memory=pin_memory)


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
                      worker_init_fn=return_freed_memory)


def normalize_answer(text):
    """For exact-match accuracy: lowercase, punctuation (brackets too) dropped, whitespace collapsed."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def load_tokenizer(path):
    """The LM's tokenizer, from its HF directory."""
    return AutoTokenizer.from_pretrained(path)


# -----------------------------------------------------------------------------
# python -m nanovlm.data --bench: loader throughput against raw torchcodec decoding

class _RawDecode(Dataset):
    """The floor: decode the same frames (same indices) with torchcodec and nothing else."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        from torchcodec.decoders import VideoDecoder
        epoch, _, i = key
        decoder = VideoDecoder(self.dataset.media_path(i), seek_mode="approximate", num_ffmpeg_threads=1)
        generator = seeded_generator(self.dataset.seed, epoch, self.dataset.json_indices[i])
        indices = frame_indices(decoder.metadata.num_frames, self.dataset.num_frames, generator)
        return decoder.get_frames_at(indices).data


def _epoch_clips_per_second(loader, sampler, epoch):
    sampler.set_epoch(epoch)
    start, clips = time.perf_counter(), 0
    for batch in loader:
        raw = isinstance(batch, list)  # _RawDecode batches are lists of uint8 clips
        clips += len(batch) if raw else batch["num_samples"]
        for frames in batch if raw else [batch["frames"]]:
            # touch every 4 KiB page: shared memory is paged in on first read, which a trainer pays too
            frames.reshape(-1).view(torch.uint8)[::4096].sum()
    return clips / (time.perf_counter() - start)


def loader_speed(dataset, batch, workers, epochs):
    """Median clips/s of the full pipeline and of raw decoding of the same frames, over `epochs` timed passes of
    each, interleaved so that both see the same machine load. One clip per row, `batch` rows per batch."""
    sampler = RowSampler(dataset, batch, max_frames_per_row=dataset.num_frames, packing=False)
    loaders = {"full": make_loader(dataset, sampler, workers),
               "raw": DataLoader(_RawDecode(dataset), batch_sampler=sampler, num_workers=workers,
                                 persistent_workers=workers > 0, collate_fn=list)}
    rates = {name: [] for name in loaders}
    for epoch in range(epochs + 1):
        for name, loader in loaders.items():
            rate = _epoch_clips_per_second(loader, sampler, epoch)
            if epoch > 0:  # epoch 0 starts the workers
                rates[name].append(rate)
    return tuple(sorted(rates[name])[len(rates[name]) // 2] for name in ("full", "raw"))  # medians


def bench():
    parser = argparse.ArgumentParser(description="data loader throughput vs raw torchcodec decoding")
    parser.add_argument("--bench", action="store_true", required=True)
    parser.add_argument("--data", required=True, help="LLaVA-format JSON with video records")
    parser.add_argument("--media-root", required=True)
    parser.add_argument("--vision", required=True, help="HF vision tower dir (for size and mean/std)")
    parser.add_argument("--tokenizer", required=True, help="HF tokenizer dir")
    parser.add_argument("--template", default="plain", choices=TEMPLATES)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4, help="rows per batch, one clip per row")
    parser.add_argument("--epochs", type=int, default=5, help="timed passes of each loader, interleaved")
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.tokenizer)
    dataset = VLMDataset(args.data, args.media_root, tokenizer, args.vision, args.template, args.frames,
                           tokens_per_frame=1, max_tokens=1 << 20, train=True)
    if any("video" not in record for record in dataset.records):
        sys.exit(f"{args.data}: --bench measures video decoding; use a JSON whose records all have 'video'")
    full, raw = loader_speed(dataset, args.batch, args.workers, args.epochs)
    print(f"{len(dataset)} clips, {args.frames} frames -> {dataset.preprocess.size}px, {args.workers} workers")
    print(f"raw torchcodec decode: {raw:8.1f} clips/s")
    print(f"full pipeline:         {full:8.1f} clips/s  ({full / raw:.2f}x raw)")


if __name__ == "__main__":
    bench()
