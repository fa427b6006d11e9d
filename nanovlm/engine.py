"""The serving engine: one thread owns the model and one batch KV cache; requests join and leave the running batch
between decode steps (continuous batching). `nanovlm/serve.py` puts HTTP in front of it.

What is notable:
- The requests waiting when rows are free are prefilled together (right-padded, as `VLM.generate` prefills), in a
  Cache of their own; each row is then copied into a free row of the batch Cache (`Cache.insert`). No left
  padding, no recomputation.
- Every step decodes one token for each busy row, over the rows up to the last busy one (`Cache.rows`); a free row
  among them takes part as document -1, so it sees nothing and fills nothing. A new request takes the lowest free
  row, so few requests decode few rows. The greedy rows' next tokens come from one argmax over the step's logits.
- The attention mask keeps rows apart, so a greedy answer is the one the request gets alone: the same arithmetic,
  though in matmuls of other shapes, whose float rounding the tests check changes no token.
- Text streams as it is decoded: each step decodes the whole answer so far and sends what is new, holding back a
  half UTF-8 character (as `generate.Printer` does) and the beginning of a stop string.
- A cancelled request (its client went away) leaves at the next step and frees its row.
- A medium sent again (the same bytes: a chat resends its video with every turn) is not encoded again: its visual
  tokens are kept by the medium's key (`Request.media_key`, which the server makes), least recently used first out.
"""

import queue
import sys
import threading
import traceback
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import torch

from nanovlm.lm import Cache
from nanovlm.model import right_padded, sample


@dataclass(eq=False)
class Request:
    ids: torch.Tensor  # the prompt, 1-D, VISUAL_TOKEN slots included
    frames: torch.Tensor | None  # (F, 3, S, S) uint8, or None for text only
    max_tokens: int
    emit: Callable  # called on the engine thread: ("text", str), ("done", finish_reason, tokens), ("error", str)
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple = ()
    seed: int | None = None
    ignore_eos: bool = False  # vLLM's extension: decode max_tokens whatever the model says (benchmarks)
    media_key: object = None  # the same for the same medium (None: not kept)
    cancelled: bool = False  # set by the server when the client goes away
    tokens: list = field(default_factory=list)  # the answer so far (the engine's)
    shown: int = 0  # characters of it sent
    generator: torch.Generator | None = None


class Stopped(Exception):
    """The engine takes no new requests: the server is shutting down."""


class Engine:
    def __init__(self, model, tokenizer, max_batch=16, max_len=2048, max_queue=64, visual_cache_bytes=0):
        self.model, self.tokenizer, self.max_len = model, tokenizer, max_len
        self.visual = LRU(visual_cache_bytes)  # media_key -> visual tokens (F * tokens_per_frame, D)
        self.device = model.lm.embed.weight.device
        self.cache = Cache(model.cfg.lm, max_batch, max_len, self.device)
        self.rows = [None] * max_batch  # the request decoding in each row of the cache
        self.waiting = queue.Queue(max_queue)
        self.stopping = False
        self.thread = threading.Thread(target=self.run, name="nanovlm-engine", daemon=True)

    def start(self):
        self.thread.start()
        return self

    def submit(self, request):
        """Queue a request; raises queue.Full when max_queue are waiting, Stopped when shutting down."""
        if self.stopping:
            raise Stopped
        self.waiting.put_nowait(request)

    def stop(self):
        """Finish the running and waiting requests, then end the thread."""
        self.stopping = True
        self.thread.join()

    @property
    def active(self):
        return sum(r is not None for r in self.rows)

    def run(self):
        with torch.inference_mode():
            while not (self.stopping and self.waiting.empty() and not self.active):
                try:
                    self.admit(block=not self.active)
                    for row, request in enumerate(self.rows):
                        if request is not None and request.cancelled:
                            self.release(row)
                    if self.active:
                        self.step()
                except Exception as e:  # the batch failed (out of memory, ...): its requests end, the engine goes on
                    for row in range(len(self.rows)):
                        self.fail(row, e)

    def admit(self, block):
        """Prefill waiting requests into the free rows, lowest first, together; wait briefly when nothing runs."""
        batch = []
        while len(batch) < self.rows.count(None):
            try:
                request = self.waiting.get(timeout=0.05) if block and not batch else self.waiting.get_nowait()
            except queue.Empty:
                break
            if not request.cancelled:
                batch.append(request)
        try:
            if batch:
                self.prefill(batch)
        except Exception:  # again one by one, so that only a request the model cannot run fails
            for row, request in enumerate(self.rows):
                if request in batch and not request.tokens:  # placed, then the prefill failed: undone
                    self.release(row)
            for request in batch:
                if request.tokens:  # placed before the failure
                    continue
                try:
                    self.prefill([request])
                except Exception as e:
                    request.emit("error", f"{type(e).__name__}: {e}")

    def prefill(self, batch):
        """Run the prompts (right-padded, each row its own document) and move them into free rows of the cache."""
        for request in batch:
            if request.generator is None and request.temperature > 0:
                request.generator = torch.Generator(self.device)
                request.generator.manual_seed(request.seed) if request.seed is not None else request.generator.seed()
        input_ids, position_ids, document_ids = right_padded([r.ids for r in batch], self.device)
        cache = Cache(self.model.cfg.lm, len(batch), input_ids.shape[1], self.device)
        logits = self.model(input_ids, None, None, position_ids, document_ids, cache,  # (B, vocab): last tokens
                            visual=self.visual_tokens(batch))
        rows = [row for row, r in enumerate(self.rows) if r is None][:len(batch)]
        for i, (row, request) in enumerate(zip(rows, batch)):
            self.cache.insert(row, cache, i)
            self.rows[row] = request
        self.advance(rows, logits)

    def visual_tokens(self, batch):
        """The visual tokens of the batch's media in row order (None: text only): kept ones, the rest encoded
        together."""
        media = [r for r in batch if r.frames is not None]
        tokens = [self.visual.get(r.media_key) for r in media]
        new = [i for i, t in enumerate(tokens) if t is None]
        if new:
            frames = torch.cat([media[i].frames for i in new]).to(self.device)
            encoded = self.model.encode_frames(frames, self.model.lm.embed.weight.dtype)
            for i, t in zip(new, encoded.split([len(media[i].frames) for i in new])):
                tokens[i] = t.flatten(0, 1)
                self.visual.put(media[i].media_key, tokens[i])
        return torch.cat(tokens) if media else None

    def step(self):
        """One token for every busy row."""
        n = max(row for row, r in enumerate(self.rows) if r is not None) + 1
        busy = [row for row in range(n) if self.rows[row] is not None]
        tokens = torch.tensor([r.tokens[-1] if r is not None else 0 for r in self.rows[:n]])
        documents = torch.tensor([0 if r is not None else -1 for r in self.rows[:n]])  # a free row: document -1
        view = self.cache.rows(n)
        logits = self.model(tokens[:, None].to(self.device), None, None, view.lengths[:, None],
                            documents[:, None].to(self.device), view)
        self.cache.lengths[:n] = view.lengths
        self.advance(busy, logits[busy] if len(busy) < n else logits)

    def advance(self, rows, logits):
        """Take the next token of the request in each of `rows` from its logits (len(rows), vocab): the greedy ones
        in one argmax; send the new text; finish the requests that end."""
        greedy, lengths = logits.argmax(-1).tolist(), self.cache.lengths.tolist()
        for i, row in enumerate(rows):
            request = self.rows[row]
            try:
                token = greedy[i] if request.temperature == 0 else int(
                    sample(logits[i, None].float(), request.temperature, request.top_p, request.generator)[0])
                self.next_token(row, token, lengths[row])
            except Exception as e:  # e.g. a sampling setting that overflows: that request ends
                self.fail(row, e)

    def next_token(self, row, token, length):
        request = self.rows[row]
        request.tokens.append(token)
        ended = token == self.tokenizer.eos_token_id and not request.ignore_eos
        text = self.tokenizer.decode(request.tokens[:-1] if ended else request.tokens, skip_special_tokens=True)
        finish = "stop" if ended else None
        cuts = [text.find(s) for s in request.stop if s in text]
        if cuts:
            text, finish = text[:min(cuts)], "stop"
        if finish is None and (len(request.tokens) >= request.max_tokens or length >= self.max_len):
            finish = "length"
        if finish is None:
            text = text[:len(text) - held_back(text, request.stop)]
        if len(text) > request.shown:
            request.emit("text", text[request.shown:])
            request.shown = len(text)
        if finish is not None:
            request.emit("done", finish, len(request.tokens))
            self.release(row)

    def release(self, row):
        self.rows[row] = None
        self.cache.release(row)

    def fail(self, row, error):
        if self.rows[row] is not None:
            traceback.print_exc(file=sys.stderr)
            self.rows[row].emit("error", f"{type(error).__name__}: {error}")
            self.release(row)


class LRU:
    """Tensors by key, least recently used out first once their bytes pass max_bytes. Thread-safe (the server's
    media threads share one); the key None is never kept."""

    def __init__(self, max_bytes):
        self.max_bytes, self.size, self.items, self.lock = max_bytes, 0, OrderedDict(), threading.Lock()

    def get(self, key):
        with self.lock:
            value = self.items.get(key)
            if value is not None:
                self.items.move_to_end(key)
            return value

    def put(self, key, value):
        with self.lock:
            if key is None or key in self.items:
                return
            self.items[key], self.size = value, self.size + value.nbytes
            while self.size > self.max_bytes:
                self.size -= self.items.popitem(last=False)[1].nbytes


def held_back(text, stops):
    """How many characters at the end of text must wait: half a UTF-8 character, or what may begin a stop string."""
    if text.endswith("\ufffd"):
        return len(text) - len(text.rstrip("\ufffd"))
    return max([k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])], default=0)
