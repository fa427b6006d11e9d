"""Throughput and latency of `nanovlm.serve` under concurrent streaming clients, batched against one at a time:

    python -m nanovlm.serve_bench --ckpt out/synthetic_video/final --video clip.webm

Two servers, each the real command in a process of its own on 127.0.0.1: one that batches (`--max-batch 16`) and one
that answers one request at a time (`--max-batch 1`, the rest waiting in its queue). Against each, 1, 4 and 16
clients stream at once (a lean HTTP client by default, `--client openai` for the official one), each sending
requests one after the other (16 requests a level at least), all asking about the same video (a data URL) with
`ignore_eos`, so every answer is `--max-tokens` long. Both servers run all along (an idle one only waits on its queue) and each level runs against
one, then the other, `--repeats` times, so that both meet the same machine; the table shows the median run.
tokens/s: completion tokens of all clients / wall-clock time of the level; latency: request sent -> last event;
TTFT: -> first text. One warm-up request per server first.
"""

import argparse
import asyncio
import base64
import itertools
import json
import math
import mimetypes
import select
import signal
import subprocess
import sys
import time
import urllib.request
from functools import partial

import openai


def start_server(ckpt, *options, cwd=None, timeout=300):
    """`python -m nanovlm.serve` on a free port of 127.0.0.1 -> (process, base URL), once it has said where it
    listens; RuntimeError if it does not (the tests start their servers with this too)."""
    command = [sys.executable, "-m", "nanovlm.serve", "--ckpt", ckpt, "--port", "0", *options]
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, text=True)
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    line = process.stdout.readline() if ready else ""
    if "http://" not in line:
        process.kill()
        raise RuntimeError(f"the server did not start: {' '.join(command)}: {line!r}")
    return process, line.split(" on ")[1].split("/ ")[0]


async def one_request(url, payload):
    """One streamed request over a bare HTTP/1.1 connection -> (latency, time to first text, completion tokens).

    Not the `openai` client (the suite tests that one): on a machine whose cores the clients share with the server,
    its per-event parsing is CPU the server does not get, so a lean client measures the server more fairly."""
    start, first, tokens = time.perf_counter(), None, 0
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode() + payload)
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200") or b"chunked" not in head.lower():
        sys.exit(f"the server answered {head.decode().splitlines()[0]!r}: {await reader.read()!r}")
    events = b""
    while size := int((await reader.readuntil(b"\r\n")).strip(), 16):  # chunked transfer: size, data, CRLF
        events += (await reader.readexactly(size + 2))[:-2]
        *complete, events = events.split(b"\n\n")
        for event in complete:
            data = event.removeprefix(b"data: ")
            if data == b"[DONE]":
                continue
            chunk = json.loads(data)
            if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    writer.close()
    return time.perf_counter() - start, first, tokens


async def one_openai_request(client, body):
    """The same through the official client (--client openai)."""
    start, first, tokens = time.perf_counter(), None, 0
    body = dict(body)
    extra_body = {"ignore_eos": body.pop("ignore_eos")}
    stream = await client.chat.completions.create(**body, extra_body=extra_body)
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - start
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return time.perf_counter() - start, first, tokens


async def level(url, clients, requests, body, kind):
    """`clients` clients at once, each sending `requests` requests in turn -> the level's figures."""
    if kind == "openai":
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=3600)
        send = partial(one_openai_request, client, body)
    else:
        send = partial(one_request, url, json.dumps(body).encode())

    async def one_client():
        return [await send() for _ in range(requests)]

    start = time.perf_counter()
    results = [r for rs in await asyncio.gather(*(one_client() for _ in range(clients))) for r in rs]
    wall = time.perf_counter() - start
    if kind == "openai":
        await client.close()
    latencies = sorted(r[0] for r in results)
    first = sorted(r[1] for r in results)

    def percentile(values, p):
        return values[min(len(values) - 1, math.ceil(p / 100 * len(values)) - 1)]

    return dict(requests=len(results), tokens=sum(r[2] for r in results), wall=wall,
                tokens_per_s=sum(r[2] for r in results) / wall, p50=percentile(latencies, 50),
                p99=percentile(latencies, 99), ttft=percentile(first, 50))


def main(argv=None):
    parser = argparse.ArgumentParser(description="serving throughput and latency, batched against one at a time")
    parser.add_argument("--ckpt", required=True, help="a training run's out_dir/final")
    parser.add_argument("--video", required=True, help="the video every request asks about")
    parser.add_argument("--question", default="What is happening in the video?")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per answer (ignore_eos)")
    parser.add_argument("--clients", default="1,4,16", help="concurrent clients, one level each")
    parser.add_argument("--requests", type=int, default=16, help="requests a level at least")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each level; the median is shown")
    parser.add_argument("--client", choices=("http", "openai"), default="http",
                        help="http: a lean bare-HTTP client (default); openai: the official client")
    parser.add_argument("--server-options", default="", help="more nanovlm.serve flags, e.g. '--device cuda'")
    args = parser.parse_args(argv)
    mime = mimetypes.guess_type(args.video)[0] or "video/webm"
    with open(args.video, "rb") as f:
        url = f"data:{mime};base64," + base64.b64encode(f.read()).decode()
    messages = [{"role": "user", "content": [{"type": "text", "text": args.question},
                                             {"type": "video_url", "video_url": {"url": url}}]}]
    levels = [int(c) for c in args.clients.split(",")]
    options = ["--max-queue", "64", *args.server_options.split()]
    try:
        servers = {"batched": start_server(args.ckpt, "--max-batch", str(max(levels)), *options),
                   "one at a time": start_server(args.ckpt, "--max-batch", "1", *options)}
    except RuntimeError as e:
        sys.exit(str(e))
    table = {}
    try:
        with urllib.request.urlopen(f"{servers['batched'][1]}/v1/models") as response:
            model = json.load(response)["data"][0]["id"]
        body = dict(model=model, messages=messages, max_tokens=args.max_tokens, stream=True,
                    stream_options={"include_usage": True}, ignore_eos=True)
        for _, server in servers.values():
            asyncio.run(level(server, 1, 1, body, args.client))  # warm-up
        for clients, repeat, mode in itertools.product(levels, range(args.repeats), servers):  # alternated
            rounds = max(2, math.ceil(args.requests / clients))
            r = asyncio.run(level(servers[mode][1], clients, rounds, body, args.client))
            table.setdefault((mode, clients), []).append(r)
            print(f"{mode}, {clients} clients: {r['requests']} requests, {r['tokens']} tokens in {r['wall']:.1f} s",
                  file=sys.stderr, flush=True)
    finally:
        for process, _ in servers.values():
            process.send_signal(signal.SIGTERM)
            process.wait()
    table = {key: sorted(runs, key=lambda r: r["tokens_per_s"])[len(runs) // 2] for key, runs in table.items()}
    print(f"\n{args.ckpt}, {args.max_tokens} tokens per answer, {args.client} client, median of {args.repeats}\n")
    print("| clients | server | tokens/s | latency p50 | latency p99 | TTFT p50 | batched / one at a time |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for clients in levels:
        for mode in ("batched", "one at a time"):
            r = table[mode, clients]
            speedup = r["tokens_per_s"] / table["one at a time", clients]["tokens_per_s"]
            print(f"| {clients} | {mode} | {r['tokens_per_s']:.1f} | {r['p50']:.2f} s | {r['p99']:.2f} s | "
                  f"{r['ttft']:.2f} s | {f'**{speedup:.2f}x**' if mode == 'batched' else ''} |")


if __name__ == "__main__":
    main()
