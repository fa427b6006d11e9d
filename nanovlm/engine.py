"""The serving engine: one thread owns the model and one batch KV cache; requests join and leave the running batch
between decode steps (continuous batching). `nanovlm/serve.py` puts HTTP in front of it.

What is notable:
- The requests waiting when rows are free are prefilled together (right-padded, as `VLM.generate` prefills), in a
  Cache of their own; each row is then copied into a free row of the batch Cache (`Cache.insert`). No left
  padding, no recomputation.
- Every step decodes one token for each busy row, over the rows up to the last busy one (`Cache.rows`); a free row
  among them takes part as document -1, so it sees nothing and fills nothing. A new request takes the lowest free
  row, so few requests decode few rows.
- The attention mask keeps rows apart, so a greedy answer is the one the request gets alone: the same arithmetic,
  though in matmuls of other shapes, whose float rounding the tests check changes no token.
- Text streams as it is decoded: each step decodes the whole answer so far and sends what is new, holding back a
  half UTF-8 character (as `generate.Printer` does) and the beginning of a stop string.
- A cancelled request (its client went away) leaves at the next step and frees its row.
"""

import queue
import sys
import threading
import traceback
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
    cancelled: bool = False  # set by the server when the client goes away
    tokens: list = field(default_factory=list)  # the answer so far (the engine's)
    shown: int = 0  # characters of it sent
    generator: torch.Generator | None = None


class Stopped(Exception):
    """The engine takes no new requests: the server is shutting down."""


class Engine:
    def __init__(self, model, tokenizer, max_batch=16, max_len=2048, max_queue=64):
        self.model, self.tokenizer, self.max_len = model, tokenizer, max_len
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
        frames = [r.frames for r in batch if r.frames is not None]  # in row order, as their visual tokens are
        frames = torch.cat(frames).to(self.device) if frames else None
        logits = self.model(input_ids, frames, None, position_ids, document_ids, cache)  # (B, vocab): last tokens
        rows = [row for row, r in enumerate(self.rows) if r is None]
        for i, (row, request) in enumerate(zip(rows, batch)):
            self.cache.insert(row, cache, i)
            self.rows[row] = request
            self.advance(row, logits[i])

    def step(self):
        """One token for every busy row."""
        n = max(row for row, r in enumerate(self.rows) if r is not None) + 1
        busy = torch.tensor([r is not None for r in self.rows[:n]])
        tokens = torch.tensor([r.tokens[-1] if r is not None else 0 for r in self.rows[:n]])
        view = self.cache.rows(n)
        logits = self.model(tokens[:, None].to(self.device), None, None, view.lengths[:, None],
                            (busy.long() - 1)[:, None].to(self.device), view)  # free rows: document -1
        self.cache.lengths[:n] = view.lengths
        for row in range(n):
            if busy[row]:
                self.advance(row, logits[row])

    def advance(self, row, logits):
        """Take the next token of the request in `row` from its logits (vocab,); send the new text; finish it."""
        try:
            self.next_token(row, logits)
        except Exception as e:  # e.g. a sampling setting that overflows: that request ends
            self.fail(row, e)

    def next_token(self, row, logits):
        request = self.rows[row]
        token = int(sample(logits[None].float(), request.temperature, request.top_p, request.generator)[0])
        request.tokens.append(token)
        ended = token == self.tokenizer.eos_token_id and not request.ignore_eos
        text = self.tokenizer.decode(request.tokens[:-1] if ended else request.tokens, skip_special_tokens=True)
        finish = "stop" if ended else None
        cuts = [text.find(s) for s in request.stop if s in text]
        if cuts:
            text, finish = text[:min(cuts)], "stop"
        if finish is None and (len(request.tokens) >= request.max_tokens or
                               int(self.cache.lengths[row]) >= self.max_len):
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


def held_back(text, stops):
    """How many characters at the end of text must wait: half a UTF-8 character, or what may begin a stop string."""
    if text.endswith("\ufffd"):
        return len(text) - len(text.rstrip("\ufffd"))
    return max([k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])], default=0)
