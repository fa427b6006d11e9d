"""Throughput and latency of `nanovlm.serve` under concurrent streaming clients, batched against one at a time:

    python -m nanovlm.serve_bench --ckpt out/synthetic_video/final --video clip.webm

Two servers, each the real command in a process of its own on 127.0.0.1: one that batches (`--max-batch 16`) and one
that answers one request at a time (`--max-batch 1`, the rest waiting in its queue). Against each, 1, 4 and 16
clients stream at once through the official `openai` client, each sending requests one after the other (16 requests
a level at least), all asking about the same video (a data URL) with `ignore_eos`, so every answer is
`--max-tokens` long. Both servers run all along (an idle one only waits on its queue) and each level runs against
one, then the other, `--repeats` times, so that both meet the same machine; the table shows the median run.
tokens/s: completion tokens of all clients / wall-clock time of the level; latency: request sent -> last event;
TTFT: -> first text. One warm-up request per server first.
"""

import argparse
import asyncio
import base64
import itertools
import math
import mimetypes
import select
import signal
import subprocess
import sys
import time

import openai


def start_server(ckpt, max_batch, options):
    command = [sys.executable, "-m", "nanovlm.serve", "--ckpt", ckpt, "--port", "0", "--max-batch", str(max_batch),
               "--max-queue", "64", *options]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    ready, _, _ = select.select([process.stdout], [], [], 300)
    line = process.stdout.readline() if ready else ""
    if "http://" not in line:
        process.kill()
        sys.exit(f"the server did not start: {' '.join(command)}")
    return process, line.split(" on ")[1].split("/ ")[0]


async def one_request(client, model, messages, max_tokens):
    """-> (latency, time to first text, completion tokens)."""
    start, first, tokens = time.perf_counter(), None, 0
    stream = await client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - start
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return time.perf_counter() - start, first, tokens


async def level(url, model, clients, requests, messages, max_tokens):
    """`clients` clients at once, each sending `requests` requests in turn -> the level's figures."""
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=3600)

    async def one_client():
        return [await one_request(client, model, messages, max_tokens) for _ in range(requests)]

    start = time.perf_counter()
    results = [r for rs in await asyncio.gather(*(one_client() for _ in range(clients))) for r in rs]
    wall = time.perf_counter() - start
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
    parser.add_argument("--server-options", default="", help="more nanovlm.serve flags, e.g. '--device cuda'")
    args = parser.parse_args(argv)
    mime = mimetypes.guess_type(args.video)[0] or "video/webm"
    with open(args.video, "rb") as f:
        url = f"data:{mime};base64," + base64.b64encode(f.read()).decode()
    messages = [{"role": "user", "content": [{"type": "text", "text": args.question},
                                             {"type": "video_url", "video_url": {"url": url}}]}]
    levels = [int(c) for c in args.clients.split(",")]
    servers = {"batched": start_server(args.ckpt, max(levels), args.server_options.split()),
               "one at a time": start_server(args.ckpt, 1, args.server_options.split())}
    table = {}
    try:
        model = openai.OpenAI(base_url=f"{servers['batched'][1]}/v1", api_key="none").models.list().data[0].id
        for _, server in servers.values():
            asyncio.run(level(server, model, 1, 1, messages, args.max_tokens))  # warm-up
        for clients, repeat, mode in itertools.product(levels, range(args.repeats), servers):  # alternated
            rounds = max(2, math.ceil(args.requests / clients))
            r = asyncio.run(level(servers[mode][1], model, clients, rounds, messages, args.max_tokens))
            table.setdefault((mode, clients), []).append(r)
            print(f"{mode}, {clients} clients: {r['requests']} requests, {r['tokens']} tokens in {r['wall']:.1f} s",
                  file=sys.stderr, flush=True)
    finally:
        for process, _ in servers.values():
            process.send_signal(signal.SIGTERM)
            process.wait()
    table = {key: sorted(runs, key=lambda r: r["tokens_per_s"])[len(runs) // 2] for key, runs in table.items()}
    print(f"\n{args.ckpt}, {args.max_tokens} tokens per answer, median of {args.repeats}\n")
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
