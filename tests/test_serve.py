"""nanovlm.serve: the OpenAI-compatible server, its engine and its page, against a tiny model built here.

Servers are the real command (`python -m nanovlm.serve`) in a subprocess on 127.0.0.1 and a free port; every request
loop is bounded and every process is ended. CPU, fp32, no network."""

import base64
import http.client
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import openai
import pytest
import torch
import transformers as tf
from PIL import Image
from safetensors.torch import save_file

import prepare
from nanovlm import generate, serve_bench
from nanovlm.data import encode, expand_visual
from nanovlm.engine import LRU, Engine, Request, held_back
from nanovlm.generate import load_final, prompt_ids
from nanovlm.media import load_image, load_preprocess, load_video
from nanovlm.serve import APIError, Limits, load_media, parse_messages, prompt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE, NUM_FRAMES = 32, 4
QUESTION = "What is happening?"
TEXTS = ["What is happening? Pushing something from left to right.", "A red circle moves up, a blue square down.",
         "A chat between a curious user and an artificial intelligence assistant. USER: ASSISTANT:"]
LIMITS = ["--max-tokens", "64", "--max-pixels", str(48 * 48), "--max-video-frames", "30", "--max-media-bytes",
          "60000", "--max-request-bytes", "200000"]


def write_clip(path, size=SIZE, frames=12):
    """A VP9 .webm made with ffmpeg: a moving test pattern."""
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", f"testsrc=size={size}x{size}:rate=12",
                    "-frames:v", str(frames), "-c:v", "libvpx-vp9", "-deadline", "realtime", str(path)], check=True)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A run's final/ (tiny random towers, weights wide enough that answers vary) and media under root/media."""
    root = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    tokenizer = prepare.train_tokenizer(TEXTS, root / "lm")
    lm = tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    with torch.no_grad():
        for p in lm.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.5)
    lm.save_pretrained(root / "lm")
    tf.CLIPVisionModel(tf.CLIPVisionConfig(image_size=SIZE, patch_size=16, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=4)).save_pretrained(root / "vision")
    final = root / "run" / "final"
    final.mkdir(parents=True)
    (final / "nanovlm.json").write_text(json.dumps({
        "vision_path": str(root / "vision"), "lm_path": str(root / "lm"), "projector": "mlp2x_gelu",
        "pool_stride": 1, "vision_select_layer": -2, "template": "vicuna_v1", "num_frames": NUM_FRAMES}))
    tokenizer.save_pretrained(final)
    save_file({"projector.0.weight": torch.randn(32, 32), "projector.0.bias": torch.randn(32),
               "projector.2.weight": torch.randn(32, 32), "projector.2.bias": torch.randn(32)},
              final / "trained.safetensors")
    media = root / "media"
    media.mkdir()
    write_clip(media / "clip.webm")
    write_clip(media / "other.webm", size=40, frames=20)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 28, 3), dtype=np.uint8)).save(media / "photo.png")
    return root


def start_server(demo, *options):
    """The real command on a free port -> (process, base URL)."""
    try:
        return serve_bench.start_server(str(demo / "run" / "final"), "--allowed-media-dir", str(demo / "media"),
                                        *options, cwd=REPO, timeout=120)
    except RuntimeError as e:
        pytest.fail(str(e))


def stop_server(process):
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def server(demo):
    process, url = start_server(demo, *LIMITS)
    yield url
    stop_server(process)
    assert process.returncode == -signal.SIGTERM  # uvicorn drains, then re-raises the signal it caught


@pytest.fixture(scope="module")
def reference(demo):
    """What `python -m nanovlm.generate` answers: the model, tokenizer, info to compute it in-process."""
    return load_final(str(demo / "run" / "final"))


def data_url(path, mime):
    return f"data:{mime};base64," + base64.b64encode(open(path, "rb").read()).decode()


def expected(reference, kind, path, question=QUESTION, max_tokens=12, temperature=0.0, seed=0):
    """The answer `nanovlm.generate` gives (same prompt, frames, sampling)."""
    model, tokenizer, info = reference
    pre = load_preprocess(info["vision_path"])
    frames = None if kind is None else load_video(str(path), NUM_FRAMES, pre) if kind == "video" else \
        load_image(str(path), pre)
    ids = prompt_ids(question, kind, tokenizer, info, model.cfg.tokens_per_frame)
    generator = torch.Generator().manual_seed(seed)
    [answer] = model.generate([ids], frames, max_tokens, temperature, 1.0, tokenizer.eos_token_id, generator)
    return tokenizer.decode(answer, skip_special_tokens=True)


def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)


def ask(url, content, **settings):
    """A request through the official client -> (text, finish_reason, usage); streamed when stream=True."""
    messages = [{"role": "user", "content": content}]
    if not settings.pop("stream", False):
        answer = client(url).chat.completions.create(model="run", messages=messages, **settings)
        return answer.choices[0].message.content, answer.choices[0].finish_reason, answer.usage
    chunks = list(client(url).chat.completions.create(model="run", messages=messages, stream=True,
                                                      stream_options={"include_usage": True}, **settings))
    assert all(c.object == "chat.completion.chunk" for c in chunks) and chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    return text, finish[0], chunks[-1].usage


def parts(question, kind=None, url=None):
    content = [{"type": "text", "text": question}]
    return content + ([{"type": f"{kind}_url", f"{kind}_url": {"url": url}}] if kind else [])


def test_openai_client_answers_equal_generate(demo, server, reference, capsys):
    """The official client, a video (a data URL of an ffmpeg clip) and an image, streamed and not: the answers are
    the ones `python -m nanovlm.generate` prints for the same files, with finish_reason and usage."""
    clip, photo = demo / "media" / "clip.webm", demo / "media" / "photo.png"
    assert generate.main(["--ckpt", str(demo / "run" / "final"), "--max_new_tokens", "12", "--video", str(clip),
                          "--image", str(photo), "--", QUESTION]) == 0
    printed = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    model, tokenizer, info = reference
    for kind, path, mime in (("video", clip, "video/webm"), ("image", photo, "image/png")):
        prompt_tokens = len(prompt_ids(QUESTION, kind, tokenizer, info, model.cfg.tokens_per_frame))
        for stream in (False, True):
            text, finish, usage = ask(server, parts(QUESTION, kind, data_url(path, mime)), max_tokens=12,
                                      stream=stream)
            assert text == printed[str(path)] == expected(reference, kind, path)
            assert finish == ("length" if usage.completion_tokens == 12 else "stop")
            assert usage.prompt_tokens == prompt_tokens
            assert usage.total_tokens == prompt_tokens + usage.completion_tokens
    text, _, _ = ask(server, parts(QUESTION, "video", f"file://{clip}"), max_tokens=12)  # an allowed local file
    assert text == printed[str(clip)]
    files = ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(demo / "media")))
    threading.Thread(target=files.serve_forever, daemon=True).start()
    try:  # an http URL, here on the loopback
        text, _, _ = ask(server, parts(QUESTION, "image", f"http://127.0.0.1:{files.server_port}/photo.png"),
                         max_tokens=12)
    finally:
        files.shutdown()
        files.server_close()
    assert text == printed[str(photo)]
    assert client(server).models.list().data[0].id == "run"
    text, _, _ = ask(server, QUESTION, max_tokens=12)  # content as a plain string, no medium
    assert text == expected(reference, None, None)


def test_sampling_seed_and_stop(demo, server, reference):
    """temperature/top_p with a seed give generate's sampled answer; a stop string cuts the answer before it."""
    clip = demo / "media" / "clip.webm"
    sampled = expected(reference, "video", clip, max_tokens=16, temperature=0.9, seed=7)
    for stream in (False, True):
        text, _, _ = ask(server, parts(QUESTION, "video", data_url(clip, "video/webm")), max_tokens=16,
                         temperature=0.9, top_p=1.0, seed=7, stream=stream)
        assert text == sampled
    greedy = expected(reference, "video", clip, max_tokens=16)
    stop = greedy[len(greedy) // 2:len(greedy) // 2 + 2]
    for stream in (False, True):
        text, finish, _ = ask(server, parts(QUESTION, "video", data_url(clip, "video/webm")), max_tokens=16,
                              stop=[stop, "never said"], stream=stream)
        assert text == greedy[:greedy.index(stop)] and finish == "stop"
    assert held_back("ab\ufffd", ()) == 1 and held_back("the end of", ("of it",)) == 2
    assert held_back("the end o", ("of it",)) == 1 and held_back("the end", ("of it",)) == 0


def test_sixteen_concurrent_streams_equal_their_sequential_answers(demo, server, reference):
    """16 streaming clients at once (videos, an image, text, greedy and seeded sampling, different lengths): all
    complete, each with the answer it gets alone, and the server did decode them together."""
    media = demo / "media"
    jobs = []
    for k in range(16):
        kind, path = [("video", media / "clip.webm"), ("video", media / "other.webm"), ("image", media / "photo.png"),
                      (None, None)][k % 4]
        question = ["What is happening?", "Describe the video.", "A red circle moves up?", "Left or right?"][k // 4]
        settings = dict(max_tokens=8 + 3 * k, temperature=0.8 if k % 5 == 0 else 0.0, seed=k)
        jobs.append((kind, path, question, settings))
    busiest, done = [], threading.Event()

    def watch():  # how many requests decode at once, while they run
        while not done.is_set() and len(busiest) < 2000:
            busiest.append(json.loads(get(server, "/health")[1])["active"])
            time.sleep(0.01)

    def run(job):
        kind, path, question, settings = job
        url = kind and data_url(path, "image/png" if kind == "image" else "video/webm")
        return ask(server, parts(question, kind, url) if kind else question, stream=True, **settings)

    watcher = threading.Thread(target=watch)
    watcher.start()
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(run, jobs))
    done.set()
    watcher.join()
    for (kind, path, question, settings), (text, finish, usage) in zip(jobs, answers):
        assert text == expected(reference, kind, path, question, **settings)
        assert usage.completion_tokens <= settings["max_tokens"]
    assert max(busiest) >= 4, busiest


def get(url, path):
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    connection.request("GET", path)
    response = connection.getresponse()
    return response.status, response.read().decode()


def post(url, body, path="/v1/chat/completions"):
    """A raw POST (bytes or a JSON-able object) -> (status, parsed JSON body)."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    connection.request("POST", path, data, {"Content-Type": "application/json"})
    response = connection.getresponse()
    return response.status, json.loads(response.read() or b"null")


def user(*content, **settings):
    return {"model": "run", "messages": [{"role": "user", "content": list(content)}], "max_tokens": 4, **settings}


def video(url):
    return {"type": "video_url", "video_url": {"url": url}}


def image(url):
    return {"type": "image_url", "image_url": {"url": url}}


def test_hostile_requests_get_their_status_and_the_server_goes_on(demo, server, reference, tmp_path):
    """Each bad request gets the documented status and an OpenAI error naming what is wrong (and where); /health
    stays OK and a good request is still answered."""
    media, text = demo / "media", {"type": "text", "text": QUESTION}
    (tmp_path / "notes.webm").write_text("not a video at all\n" * 20)
    write_clip(tmp_path / "long.webm", frames=28)
    data = (tmp_path / "long.webm").read_bytes()
    (tmp_path / "truncated.webm").write_bytes(data[:len(data) // 2])
    write_clip(tmp_path / "many.webm", frames=40)
    write_clip(tmp_path / "wide.webm", size=64)
    Image.new("RGB", (60, 60)).save(tmp_path / "big.png")
    (media / "escape.webm").unlink(missing_ok=True)
    os.symlink(media.parent / "run" / "final" / "nanovlm.json", media / "escape.webm")
    clip = data_url(media / "clip.webm", "video/webm")
    cases = [  # (request, status, words in the message, param)
        (b'{"messages": [', 400, "not valid JSON", None),
        (b'[1, 2]', 400, "must be a JSON object", None),
        ({"messages": []}, 400, "non-empty list", "messages"),
        ({"model": "run"}, 400, "non-empty list", "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "expected system or user", "messages[0].role"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, 400,
         "expected assistant", "messages[1].role"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, 400,
         "must be from the user", "messages[1].role"),
        ({"messages": [{"role": "user", "content": 7}]}, 400, "string or a list of parts", "messages[0].content"),
        (user(text, {"type": "audio_url", "audio_url": {"url": clip}}), 400, "'audio_url' is not accepted",
         "messages[0].content[1]"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": [video(clip)]},
                       {"role": "user", "content": "b"}]}, 400, "assistant message takes text",
         "messages[1].content[0]"),
        (user(text, {"type": "video_url", "video_url": "clip.webm"}), 400, "must be {'url': str}",
         "messages[0].content[1].video_url"),
        (user(text, video("data:video/webm;base64,AAAA!!!=")), 400, "bad base64", "messages[0].content[1].video_url"),
        (user(text, video("data:video/webm,rawbytes")), 400, "data:<type>;base64", "messages[0].content[1].video_url"),
        (user(text, video(data_url(tmp_path / "notes.webm", "video/webm"))), 400, "cannot read the video",
         "messages[0].content[1].video_url"),
        (user(text, video(data_url(tmp_path / "truncated.webm", "video/webm"))), 400, "truncated video",
         "messages[0].content[1].video_url"),
        (user(text, image(clip)), 400, "cannot read the image", "messages[0].content[1].image_url"),
        (user(text, video("file:///etc/passwd")), 400, "not under a directory this server allows", None),
        (user(text, video(f"file://{media / 'escape.webm'}")), 400, "not under a directory", None),  # symlink out
        (user(text, video(str(media / "missing.webm"))), 400, "no such file", None),
        (user(text, video(data_url(tmp_path / "many.webm", "video/webm"))), 413, "frames, over the limit of 30",
         "messages[0].content[1].video_url"),
        (user(text, video(data_url(tmp_path / "wide.webm", "video/webm"))), 413, "4096 pixels a frame", None),
        (user(text, image(data_url(tmp_path / "big.png", "image/png"))), 413, "3600 pixels, over the limit", None),
        (user(text, video("data:video/webm;base64," + "A" * 90000)), 413, "over 60000 bytes", None),
        (user(text, {"type": "text", "text": "x" * 250000}), 413, "over 200000 (--max-request-bytes)", None),
        (user(text, max_tokens=65), 400, "over this server's cap of 64", "max_tokens"),
        (user(text, max_completion_tokens=0), 400, "'max_completion_tokens' must be an integer",
         "max_completion_tokens"),
        (user(text, max_tokens="12"), 400, "must be an integer", "max_tokens"),
        (user(text, temperature=3), 400, "'temperature' must be a number in [0.0, 2.0]", "temperature"),
        (user(text, stop=["a", "b", "c", "d", "e"]), 400, "at most 4", "stop"),
        (user(text, n=2), 400, "'n' must be 1", "n"),
        (user(text, stream="yes"), 400, "'stream' must be true or false", "stream"),
        (user(text, model="gpt-4o"), 404, "model 'gpt-4o' not found: this server serves 'run'", "model"),
        (user(text, video(clip), video(clip)), 400, "2 images/videos in the request",
         "messages[0].content[2].video_url"),
        (user({"type": "text", "text": "look: <video>"}, video(clip)), 400, "must not contain <video>",
         "messages[0].content"),
        (user({"type": "text", "text": "word " * 2100}), 400, "over the context of 2048 tokens", "messages"),
    ]
    for body, status, words, param in cases:
        got, answer = post(server, body)
        assert got == status and words in answer["error"]["message"], (body if isinstance(body, bytes) else
                                                                         json.dumps(body)[:300], got, answer)
        assert answer["error"]["type"] and (param is None or answer["error"]["param"] == param), answer
    assert get(server, "/v1/chat/completions")[0] == 405
    status, body = get(server, "/nowhere")
    assert status == 404 and json.loads(body)["error"]["message"] == "Not Found"
    assert json.loads(get(server, "/health")[1]) == {"status": "ok", "active": 0, "waiting": 0}
    status, answer = post(server, user(text, video(clip), max_tokens=12))
    assert status == 200 and answer["choices"][0]["message"]["content"] == expected(
        reference, "video", media / "clip.webm")


def open_stream(url, body):
    """Start a streaming request on a raw connection -> (connection, response), the first event read."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    connection.request("POST", "/v1/chat/completions", json.dumps({**body, "stream": True}),
                       {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")
    return connection, response


def wait_for(condition, seconds=30):
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def test_a_client_that_disconnects_mid_stream_frees_its_row(server):
    """A long answer whose client goes away after the first event: its row is freed long before it would end."""
    connection, response = open_stream(server, user({"type": "text", "text": QUESTION}, max_tokens=64,
                                                    ignore_eos=True))
    response.readline()
    connection.sock.shutdown(2)
    connection.close()
    wait_for(lambda: json.loads(get(server, "/health")[1])["active"] == 0)
    status, answer = post(server, user({"type": "text", "text": QUESTION}))
    assert status == 200 and answer["usage"]["completion_tokens"] >= 1


def test_queue_full_then_sigterm_finishes_running_requests(demo):
    """One row, one queue place: while a long answer runs, of three more requests one waits and the others get 429.
    SIGTERM then lets the running and the waiting request finish whole, refuses new connections, and ends the
    process."""
    process, url = start_server(demo, "--max-batch", "1", "--max-queue", "1", "--max-tokens", "1000")
    try:
        long = user({"type": "text", "text": QUESTION}, max_tokens=1000, ignore_eos=True)
        running = open_stream(url, {**long, "stream_options": {"include_usage": True}})
        with ThreadPoolExecutor(3) as pool:
            more = [pool.submit(post, url, {**long, "max_tokens": 5}) for _ in range(3)]
            wait_for(lambda: sum(f.done() for f in more) >= 2)  # the waiting one cannot end before the long one
            refused = [f.result() for f in more if f.done()]
            assert any(status == 429 and "--max-queue" in answer["error"]["message"] for status, answer in refused)
            process.send_signal(signal.SIGTERM)
            rest = running[1].read().decode()
            answered = [f.result(60) for f in more if f.result(60)[0] == 200]
        assert len(answered) >= 1 and all(answer["usage"]["completion_tokens"] == 5 for _, answer in answered)
        events = [line.removeprefix("data: ") for line in rest.splitlines() if line]
        assert events[-1] == "[DONE]" and json.loads(events[-3])["choices"][0]["finish_reason"] == "length"
        assert json.loads(events[-2])["usage"]["completion_tokens"] == 1000  # the whole answer, not a cut one
        process.wait(30)
        assert process.returncode == -signal.SIGTERM
        with pytest.raises(ConnectionRefusedError):
            get(url, "/health")
    finally:
        stop_server(process)


def test_the_page_streams_an_answer_in_headless_chromium(demo, server, reference, tmp_path):
    """The page at /: choose a clip, ask, and the streamed answer appears, read back from the DOM."""
    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 800, "height": 640})
            page.goto(server + "/")
            page.set_input_files("#file", str(demo / "media" / "clip.webm"))
            page.wait_for_selector("#preview video")
            page.fill("#question", QUESTION)
            page.click("#ask")
            page.wait_for_selector("#answer[data-state=done]", timeout=60_000)
            answer = page.inner_text("#answer")
            page.screenshot(path=str(tmp_path / "ui.png"))
        finally:
            browser.close()
    assert answer == expected(reference, "video", demo / "media" / "clip.webm", max_tokens=64)


def test_prompts_are_built_as_training_builds_them(reference):
    """One turn with a medium is generate.prompt_ids' prompt; several turns go through data.encode, the medium's
    placeholder after its turn's text."""
    model, tokenizer, info = reference
    tokens_per_frame = model.cfg.tokens_per_frame
    for kind in ("video", "image"):
        turns, media = parse_messages([{"role": "user", "content": parts(QUESTION, kind, "x")}])
        assert torch.equal(prompt(turns, media, tokenizer, info, tokens_per_frame),
                           prompt_ids(QUESTION, kind, tokenizer, info, tokens_per_frame))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": parts("Hi.", "video", "x")},
                {"role": "assistant", "content": [{"type": "text", "text": "Hello."}]}, {"role": "user",
                                                                                         "content": QUESTION}]
    ids = prompt(*parse_messages(messages), tokenizer, info, tokens_per_frame)
    conversation = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi.\n<video>"},
                    {"from": "gpt", "value": "Hello."}, {"from": "human", "value": QUESTION},
                    {"from": "gpt", "value": ""}]
    reference_ids = expand_visual(torch.tensor(encode(conversation, tokenizer, "vicuna_v1", True)[0]),
                                  NUM_FRAMES * tokens_per_frame)[0]
    assert torch.equal(ids, reference_ids)
    with pytest.raises(APIError, match="the plain template takes one human"):
        prompt(*parse_messages(messages), tokenizer, {**info, "template": "plain"}, tokens_per_frame)


def test_engine_rows_are_independent(demo, reference):
    """In-process: requests that join a running batch at different steps, in rows freed by others, answer as each
    does alone (greedy), and a freed row is masked out."""
    model, tokenizer, info = reference
    pre = load_preprocess(info["vision_path"])
    frames = [load_video(str(demo / "media" / name), NUM_FRAMES, pre) for name in ("clip.webm", "other.webm")]
    questions = ["What is happening?", "Describe the video.", "Left or right?", "A red circle moves up?"]
    jobs = [(prompt_ids(q, "video", tokenizer, info, model.cfg.tokens_per_frame), frames[k % 2], 6 + 5 * k)
            for k, q in enumerate(questions * 2)]
    answers = [[] for _ in jobs]
    engine = Engine(model, tokenizer, max_batch=3, max_len=256, max_queue=16)
    with torch.inference_mode():
        for k, (ids, video, max_tokens) in enumerate(jobs):
            engine.waiting.put(Request(ids, video, max_tokens, lambda *event, k=k: answers[k].append(event),
                                       ignore_eos=True))
        while not engine.waiting.empty() or engine.active:
            engine.admit(block=False)
            if engine.active:
                engine.step()
            assert engine.active <= 3
    for (ids, video, max_tokens), events in zip(jobs, answers):
        [alone] = model.generate([ids], video, max_tokens)
        assert "".join(e[1] for e in events if e[0] == "text") == tokenizer.decode(alone, skip_special_tokens=True)
        assert events[-1] == ("done", "length", max_tokens)
    assert engine.cache.lengths.tolist() == [0, 0, 0] and (engine.cache.document_ids == -1).all()


def test_media_sent_again_is_neither_decoded_nor_encoded_again(demo, reference, tmp_path):
    """The server keeps decoded frames by the medium's bytes (a local file by path, size and mtime: rewritten, it is
    decoded anew); the engine keeps visual tokens by the same key, so the tower runs once for a video asked about
    twice, and the answers are the ones without any cache."""
    model, tokenizer, info = reference
    pre, limits = load_preprocess(info["vision_path"]), Limits(allowed_media_dir=(str(tmp_path),))
    clip = tmp_path / "clip.webm"
    shutil.copy(demo / "media" / "clip.webm", clip)
    frames_cache = LRU(1 << 20)
    load = partial(load_media, "video", str(clip), "messages[0].content[1].video_url", NUM_FRAMES, pre, limits,
                   frames_cache)
    first, key = load()
    again, same_key = load()
    data = data_url(clip, "video/webm")
    from_data, data_key = load_media("video", data, "where", NUM_FRAMES, pre, limits, frames_cache)
    assert again is first and same_key == key and torch.equal(from_data, first) and data_key != key
    shutil.copy(demo / "media" / "other.webm", clip)
    other, other_key = load()
    assert other_key != key and not torch.equal(other, first)

    calls = []
    hook = model.vision.register_forward_hook(lambda *_: calls.append(1))
    ids = prompt_ids(QUESTION, "video", tokenizer, info, model.cfg.tokens_per_frame)

    def answer(engine, frames, key):
        events = []
        engine.waiting.put(Request(ids, frames, 8, lambda *event: events.append(event), media_key=key,
                                   ignore_eos=True))
        while not engine.waiting.empty() or engine.active:
            engine.admit(block=False)
            if engine.active:
                engine.step()
        return "".join(e[1] for e in events if e[0] == "text")

    try:
        with torch.inference_mode():
            kept, none = Engine(model, tokenizer, 2, 128, visual_cache_bytes=1 << 20), Engine(model, tokenizer, 2, 128)
            answers = [answer(kept, first, key), answer(kept, first, key), answer(kept, other, other_key)]
            assert len(calls) == 2  # the first video once, then the other
            assert answers[:2] == [answer(none, first, key)] * 2 and answers[2] == answer(none, other, other_key)
            assert len(calls) == 4  # without a cache the tower runs every time
            for frames, k in ((first, key), (other, other_key)):  # each key holds its own video's tokens
                assert torch.allclose(kept.visual.get(k), model.encode_frames(frames).flatten(0, 1), atol=1e-6)
    finally:
        hook.remove()


def test_lru_keeps_the_recently_used_within_its_bytes():
    cache = LRU(250)
    for key in "abc":
        cache.put(key, torch.zeros(100, dtype=torch.uint8))
        if key == "b":
            cache.get("a")  # a is now more recent than b
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None
    assert cache.size == 200
    cache.put(None, torch.zeros(1))
    assert cache.get(None) is None and cache.size == 200
    assert LRU(0).get("x") is None
