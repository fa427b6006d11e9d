"""Serve a trained model behind OpenAI's chat-completions API, with a web page at /:

    python -m nanovlm.serve --ckpt out/synthetic_video/final [--host 127.0.0.1] [--port 8000]

What is notable:
- The shapes are OpenAI's (and vLLM's `video_url` part), so the official `openai` client works unchanged. The
  server only translates: it checks the request, reads and decodes the medium in a thread pool (off the event
  loop), builds the prompt with `data.encode`, the function training used, and hands it to the engine
  (`nanovlm/engine.py`), which batches all running requests and streams their text back.
- One image or video per request: nanovlm trains one medium per sample. Several turns are accepted; the medium's
  placeholder follows the text of the user turn that holds it, as in training data ("question\\n<video>").
- Every limit is a setting (`Limits`, the flags below) and every refusal is OpenAI's error object naming the
  offending field, e.g. `messages[0].content[1].video_url`: 400 malformed, 404 unknown model, 413 over a size
  limit, 429 queue full, 503 shutting down.
- A medium sent again (a chat resends its video with every turn) is neither decoded nor encoded again: its frames
  are kept here and its visual tokens by the engine, by a key of its bytes (`--media-cache-bytes` each).
- SIGTERM (uvicorn's graceful shutdown): no new connections; running and queued requests finish; then it exits.
"""

import argparse
import asyncio
import base64
import binascii
import copy
import hashlib
import io
import json
import os
import queue
import socket
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, fields

import torch
import uvicorn
from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from PIL import Image
from starlette.exceptions import HTTPException

from nanovlm.data import PLACEHOLDER, encode, expand_visual
from nanovlm.engine import LRU, Engine, Request, Stopped
from nanovlm.generate import load_final
from nanovlm.media import load_image, load_preprocess, load_video


@dataclass
class Limits:
    max_request_bytes: int = 32 << 20  # request body (413)
    max_media_bytes: int = 20 << 20  # one image or video file (413)
    max_video_frames: int = 18_000  # frames a video's header claims (413): 10 min at 30 fps
    max_video_seconds: float = 600.0  # a video's duration (413)
    max_pixels: int = 3840 * 2160  # width x height of a video frame or an image (413)
    max_tokens: int = 512  # cap on max_tokens / max_completion_tokens (400); the default when a request has none
    media_timeout: float = 10.0  # seconds to fetch an http(s) medium
    allowed_media_dir: tuple = ()  # local paths and file:// URLs must lie under one of these (else 400)
    media_cache_bytes: int = 256 << 20  # kept for media sent again: this many bytes of frames, and of their tokens


class APIError(Exception):
    TYPES = {400: "invalid_request_error", 404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
             500: "server_error", 503: "service_unavailable"}

    def __init__(self, status, message, param=None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def body(self):
        return {"error": {"message": self.message, "type": self.TYPES[self.status], "param": self.param, "code": None}}


def check(condition, status, message, param=None):
    if not condition:
        raise APIError(status, message, param)


# ---------------------------------------------------------------------------------------------------------------------
# The request: JSON -> a conversation for data.encode, one medium, sampling settings

def parse_messages(messages):
    """OpenAI messages -> (turns {"from", "value"} as in training data, media [(kind, url, where, turn)])."""
    check(isinstance(messages, list) and messages, 400, "'messages' must be a non-empty list", "messages")
    turns, media = [], []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        after_system = i - (turns[0]["from"] == "system" if turns else 0)
        expected = ("system", "user") if i == 0 else ("user",) if after_system % 2 == 0 else ("assistant",)
        check(role in expected, 400, f"messages[{i}].role is {role!r}, expected {' or '.join(expected)}: an optional "
              "system message, then user and assistant alternating, ending with user", f"messages[{i}].role")
        text = parse_content(message.get("content"), role, f"messages[{i}]", media, len(turns))
        turns.append({"from": {"system": "system", "user": "human", "assistant": "gpt"}[role], "value": text})
    check(turns[-1]["from"] == "human", 400, f"messages[{i}] must be from the user: it is what is answered",
          f"messages[{i}].role")
    return turns, media


def parse_content(content, role, where, media, turn):
    """A message's content (a string or parts) -> its text; its image/video parts are added to media."""
    if isinstance(content, str):
        content = [{"type": "text", "text": content}]
    check(isinstance(content, list), 400, f"{where}.content must be a string or a list of parts", f"{where}.content")
    texts = []
    for j, part in enumerate(content):
        kind, at = part.get("type") if isinstance(part, dict) else None, f"{where}.content[{j}]"
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
            continue
        accepted = "text, image_url and video_url" if role == "user" else "text"
        check(kind in ("image_url", "video_url") and role == "user", 400,
              f"{at}: part type {kind!r} is not accepted here; a {role} message takes {accepted} parts", at)
        url = part[kind].get("url") if isinstance(part.get(kind), dict) else None
        check(isinstance(url, str), 400, f"{at}.{kind} must be {{'url': str}}", f"{at}.{kind}")
        media.append((kind.removesuffix("_url"), url, f"{at}.{kind}", turn))
    text = "\n".join(texts)
    check(not PLACEHOLDER.search(text), 400, f"{where}: the text must not contain <video>/<image>; send the medium "
          "as an image_url or video_url part", f"{where}.content")
    return text


def number(body, key, default, low, high, integer=False):
    value = body.get(key)
    if value is None:
        return default
    check(not isinstance(value, bool) and isinstance(value, int if integer else (int, float)) and low <= value <= high,
          400, f"'{key}' must be {'an integer' if integer else 'a number'} in [{low}, {high}], got {value!r}", key)
    return value


def sampling(body, limits):
    """The settings a request may give, checked -> engine.Request's fields (max_tokens None: the default)."""
    check(body.get("n") in (None, 1), 400, f"'n' must be 1, got {body.get('n')!r}: one answer per request", "n")
    for key in ("tools", "logprobs"):
        check(not body.get(key), 400, f"'{key}' is not supported by this server", key)
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = number(body, key, None, 1, 1 << 31, integer=True)
    check(max_tokens is None or max_tokens <= limits.max_tokens, 400, f"'{key}' is {max_tokens}, over this "
          f"server's cap of {limits.max_tokens} (--max-tokens)", key)
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    check(isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) and s for s in stop), 400,
          "'stop' must be a string or a list of at most 4 non-empty strings", "stop")
    for key in ("stream", "ignore_eos"):
        check(isinstance(body.get(key, False), bool), 400, f"'{key}' must be true or false", key)
    return dict(max_tokens=max_tokens, temperature=number(body, "temperature", 0.0, 0.0, 2.0),
                top_p=number(body, "top_p", 1.0, 1e-9, 1.0), stop=tuple(stop),
                seed=number(body, "seed", None, -(1 << 63), (1 << 63) - 1, integer=True),
                ignore_eos=body.get("ignore_eos", False))


def prompt(turns, media, tokenizer, info, tokens_per_frame):
    """The prompt ids, with the medium's placeholder after its turn's text, encoded as training encodes."""
    turns = [dict(turn) for turn in turns] + [{"from": "gpt", "value": ""}]
    if media:
        kind, _, _, turn = media[0]
        turns[turn]["value"] += "\n<video>" if kind == "video" else "\n<image>"
    try:
        ids, _ = encode(turns, tokenizer, info["template"], for_generation=True)
    except ValueError as e:
        raise APIError(400, f"messages: {e} (the model's template is {info['template']!r})", "messages") from None
    num_frames = {"video": info["num_frames"], "image": 1}[media[0][0]] if media else 0
    return expand_visual(torch.tensor(ids), num_frames * tokens_per_frame)[0]


# ---------------------------------------------------------------------------------------------------------------------
# Media: data: URLs, allowed local files, http(s); checked against the limits before anything is decoded

def read_media(url, where, limits):
    """-> bytes, or the path of an allowed local file."""
    too_big = f"{where}: the medium is over {limits.max_media_bytes} bytes (--max-media-bytes)"
    if url.startswith("data:"):
        header, comma, payload = url.partition(",")
        check(comma and header.endswith(";base64"), 400, f"{where}: a data URL must be data:<type>;base64,<data>",
              where)
        check(len(payload) // 4 * 3 <= limits.max_media_bytes, 413, too_big, where)
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise APIError(400, f"{where}: bad base64 in the data URL: {e}", where) from None
    if url.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(url, timeout=limits.media_timeout) as response:
                data = response.read(limits.max_media_bytes + 1)
        except (OSError, ValueError) as e:
            raise APIError(400, f"{where}: cannot fetch {url}: {e}", where) from None
        check(len(data) <= limits.max_media_bytes, 413, too_big, where)
        return data
    path = os.path.realpath(urllib.parse.unquote(url.removeprefix("file://")))  # symlinks resolved, then checked
    allowed = [os.path.realpath(d) for d in limits.allowed_media_dir]
    check(any(os.path.commonpath([path, d]) == d for d in allowed), 400, f"{where}: {url} is not under a directory "
          "this server allows (--allowed-media-dir); send the file as a data: URL", where)
    check(os.path.isfile(path), 400, f"{where}: no such file: {url}", where)
    check(os.path.getsize(path) <= limits.max_media_bytes, 413, too_big, where)
    return path


def load_media(kind, url, where, num_frames, pre, limits, cache):
    """-> (frames (F, 3, S, S) uint8, the medium's key): decoded, or kept from an earlier request with the same
    medium (its bytes' SHA-256, or a local file's path, size and mtime). Runs in the media thread pool."""
    source = read_media(url, where, limits)
    if isinstance(source, bytes):
        key = kind, hashlib.sha256(source).digest()
    else:
        stat = os.stat(source)
        key = kind, source, stat.st_size, stat.st_mtime_ns
    frames = cache.get(key)
    if frames is None:  # only media that decoded are kept, so a kept one has passed every check
        frames = decode_source(kind, source, where, num_frames, pre, limits)
        cache.put(key, frames)
    return frames, key


def decode_source(kind, source, where, num_frames, pre, limits):
    if kind == "video" and isinstance(source, bytes):  # decoded from a file, as training and generate decode
        with tempfile.NamedTemporaryFile(suffix=".video") as file:
            file.write(source)
            file.flush()
            return decode_media(kind, file.name, where, num_frames, pre, limits)
    return decode_media(kind, source, where, num_frames, pre, limits)


def decode_media(kind, source, where, num_frames, pre, limits):
    """A video file, or an image file or its bytes -> frames, once its header is within the limits."""
    def opened():
        return source if isinstance(source, str) else io.BytesIO(source)

    def failed(what, e):
        return APIError(400, f"{where}: cannot {what} the {kind}: {str(e).splitlines()[0] if str(e) else e!r}", where)

    try:
        if kind == "image":
            with Image.open(opened()) as image:
                checks = [(image.width * image.height, limits.max_pixels, "pixels", "--max-pixels")]
        else:
            from torchcodec.decoders import VideoDecoder
            header = VideoDecoder(source, seek_mode="approximate").metadata
            checks = [((header.width or 0) * (header.height or 0), limits.max_pixels, "pixels a frame", "--max-pixels"),
                      (header.num_frames or 0, limits.max_video_frames, "frames", "--max-video-frames"),
                      (header.duration_seconds or 0, limits.max_video_seconds, "seconds", "--max-video-seconds")]
    except Exception as e:  # Pillow's and FFmpeg's many errors: the file is not a readable image / video
        raise failed("read", e) from None
    for value, limit, what, flag in checks:
        check(value <= limit, 413, f"{where}: the {kind} has {value} {what}, over the limit of {limit} ({flag})", where)
    try:
        return load_image(opened(), pre) if kind == "image" else load_video(source, num_frames, pre)
    except Exception as e:
        raise failed("decode", e) from None


# ---------------------------------------------------------------------------------------------------------------------
# The app: the server translates; the engine computes

class EventStream(StreamingResponse):
    """Server-sent events that cancel their request however the response ends (the client gone, above all)."""

    def __init__(self, events, request):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.request = request

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.request.cancelled = True


def sse(payload):
    return f"data: {json.dumps(payload)}\n\n"


class Server:
    def __init__(self, engine, tokenizer, info, limits, name):
        self.engine, self.tokenizer, self.info, self.limits, self.name = engine, tokenizer, info, limits, name
        self.pool = ThreadPoolExecutor(2, thread_name_prefix="nanovlm-media")
        self.pre = load_preprocess(info["vision_path"])
        self.media_cache = LRU(limits.media_cache_bytes)  # decoded frames by medium (the engine keeps their tokens)

    async def read_body(self, request):
        limit, size = self.limits.max_request_bytes, request.headers.get("content-length", "")
        check(not size.isdigit() or int(size) <= limit, 413, f"the request has {size} bytes, over {limit} "
              "(--max-request-bytes)")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            check(len(body) <= limit, 413, f"the request is over {limit} bytes (--max-request-bytes)")
        try:
            body = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None
        check(isinstance(body, dict), 400, "the request body must be a JSON object")
        return body

    async def submit(self, request, events):
        """Check, read the medium, build the prompt, queue it -> (engine Request, checked body)."""
        body, limits, engine = await self.read_body(request), self.limits, self.engine
        check(body.get("model") in (None, self.name), 404, f"model {body.get('model')!r} not found: this server "
              f"serves {self.name!r}", "model")
        turns, media = parse_messages(body.get("messages"))
        check(len(media) <= 1, 400, f"{len(media)} images/videos in the request; this server takes one at most "
              "(nanovlm trains one medium per sample)", media[-1][2] if media else None)
        settings = sampling(body, limits)
        ids = prompt(turns, media, self.tokenizer, self.info, engine.model.cfg.tokens_per_frame)
        room = engine.max_len - len(ids)
        settings["max_tokens"] = settings["max_tokens"] or min(limits.max_tokens, room)
        check(0 < settings["max_tokens"] <= room, 400, f"the prompt has {len(ids)} tokens (visual tokens included) "
              f"and max_tokens is {settings['max_tokens']}: over the context of {engine.max_len} tokens "
              "(--max-model-len)", "messages")
        loop = asyncio.get_running_loop()
        frames, key = await loop.run_in_executor(self.pool, load_media, *media[0][:3], self.info["num_frames"],
                                                 self.pre, limits, self.media_cache) if media else (None, None)
        job = Request(ids, frames, emit=lambda *event: loop.call_soon_threadsafe(events.put_nowait, event),
                      media_key=key, **settings)
        try:
            engine.submit(job)
        except queue.Full:
            raise APIError(429, f"the server is busy: {engine.waiting.maxsize} requests are waiting (--max-queue); "
                                "retry later") from None
        except Stopped:
            raise APIError(503, "the server is shutting down") from None
        return job, body

    async def chat(self, request: HTTPRequest):
        events = asyncio.Queue()
        try:
            job, body = await self.submit(request, events)
        except APIError as e:
            return JSONResponse(e.body(), e.status)
        head = dict(id=f"chatcmpl-{uuid.uuid4().hex[:24]}", created=int(time.time()), model=self.name)
        if body.get("stream"):
            include_usage = (body.get("stream_options") or {}).get("include_usage") is True
            return EventStream(self.stream(job, events, head, include_usage), job)
        text = []
        while True:
            event = await events.get()
            if event[0] == "text":
                text.append(event[1])
                continue
            if event[0] == "error":
                return JSONResponse(APIError(500, event[1]).body(), 500)
            message = {"role": "assistant", "content": "".join(text)}
            return {**head, "object": "chat.completion", "usage": usage(job, event[2]),
                    "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": event[1]}]}

    async def stream(self, job, events, head, include_usage):
        def chunk(delta, finish=None):
            return sse({**head, "object": "chat.completion.chunk",
                        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})

        yield chunk({"role": "assistant", "content": ""})
        while True:
            batch = [await events.get()]
            while not events.empty():  # text the client has not taken yet goes out as one chunk
                batch.append(events.get_nowait())
            text = "".join(event[1] for event in batch if event[0] == "text")
            if text:
                yield chunk({"content": text})
            last = batch[-1]
            if last[0] == "error":
                yield sse(APIError(500, last[1]).body())
            elif last[0] == "done":
                yield chunk({}, last[1])
                if include_usage:
                    yield sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage(job, last[2])})
            if last[0] != "text":
                yield "data: [DONE]\n\n"
                return

    async def health(self):
        ok = self.engine.thread.is_alive() and not self.engine.stopping
        return JSONResponse({"status": "ok" if ok else "unavailable", "active": self.engine.active,
                             "waiting": self.engine.waiting.qsize()}, 200 if ok else 503)

    async def models(self):
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": int(time.time()),
                                            "owned_by": "nanovlm", "max_model_len": self.engine.max_len}]}


def usage(job, tokens):
    return dict(prompt_tokens=len(job.ids), completion_tokens=tokens, total_tokens=len(job.ids) + tokens)


def make_app(server: Server):
    @asynccontextmanager
    async def lifespan(app):
        server.engine.start()
        yield
        server.engine.stop()  # uvicorn has waited for the open requests: this drains nothing new
        server.pool.shutdown()

    async def http_error(request, e):  # unknown routes and methods in OpenAI's error shape too
        return JSONResponse(APIError(400, str(e.detail)).body(), e.status_code)

    with open(os.path.join(os.path.dirname(__file__), "ui.html")) as f:
        page = f.read()
    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None,
                  exception_handlers={HTTPException: http_error})
    app.get("/", response_class=HTMLResponse)(lambda: page)
    app.get("/health")(server.health)
    app.get("/v1/models")(server.models)
    app.post("/v1/chat/completions")(server.chat)
    return app


# ---------------------------------------------------------------------------------------------------------------------

def served_name(ckpt):
    """out/synthetic_video/final -> synthetic_video: the run's name."""
    path = os.path.abspath(ckpt).rstrip("/")
    return os.path.basename(os.path.dirname(path)) if os.path.basename(path) == "final" else os.path.basename(path)


def context_length(lm, wanted):
    """The context a batch row holds: wanted, within what the LM was trained for. Phi-3's longrope switches every
    row's RoPE factors once one row passes the original length, so batched rows stay below it."""
    longest = lm.max_position_embeddings
    if lm.rope_type == "longrope":
        longest = lm.rope_scaling["original_max_position_embeddings"]
    return min(wanted, longest)


def main(argv=None):
    parser = argparse.ArgumentParser(description="serve a trained model behind OpenAI's chat-completions API")
    parser.add_argument("--ckpt", required=True, help="a training run's out_dir/final")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0: any free port (printed)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch's CPU threads (0: torch's default)")
    parser.add_argument("--max-batch", type=int, default=16, help="requests decoding together (batch rows)")
    parser.add_argument("--max-queue", type=int, default=64, help="requests waiting for a row; more get 429")
    parser.add_argument("--max-model-len", type=int, default=2048, help="prompt + answer tokens per row")
    for f in fields(Limits):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "allowed_media_dir":
            parser.add_argument(flag, action="append", default=[], help="may be repeated; none: no local files")
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default, help=f"default {f.default}")
    args = parser.parse_args(argv)
    limits = Limits(**{f.name: getattr(args, f.name) for f in fields(Limits)})
    for directory in limits.allowed_media_dir:
        if not os.path.isdir(directory):
            parser.error(f"--allowed-media-dir {directory}: not a directory")
    if args.threads:
        torch.set_num_threads(args.threads)
    # The engine thread gives the GIL up in every torch op and must win it back from the event loop: at Python's
    # default 5 ms switch interval a 16-row step of the demo model beside a busy thread took 31.5 ms, at 1 ms 13.0 ms
    sys.setswitchinterval(0.001)
    try:
        model, tokenizer, info = load_final(args.ckpt, args.device)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    name = served_name(args.ckpt)
    # the engine decodes on its thread while handlers encode on theirs: a tokenizer each (Rust objects are not shared)
    engine = Engine(model, copy.deepcopy(tokenizer), args.max_batch, context_length(model.cfg.lm, args.max_model_len),
                    args.max_queue, limits.media_cache_bytes)
    app = make_app(Server(engine, tokenizer, info, limits, name))
    sock = socket.create_server((args.host, args.port))
    print(f"nanovlm.serve: {name} on http://{args.host}:{sock.getsockname()[1]}/ ({args.device}, "
          f"{args.max_batch} rows of {engine.max_len} tokens)", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
