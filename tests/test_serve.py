"""The OpenAI-compatible server (runtime.serve + runtime.serve_batch) on the tiny bundles: answers
equal the CLI's, concurrent requests share decoder batches, bad requests get OpenAI-style 4xx
errors, clients that go away free their rows. One live uvicorn server (a thread, a free port)."""

from __future__ import annotations

import base64
import io
import shutil
import threading
import time
from functools import partial

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from runtime import rows, serve
from runtime.chat import render as chat_render
from runtime.generate import Pipeline, Sampling
from runtime.preprocess import load_image
from runtime.serve import make_app
from runtime.serve_images import ImageLimits, load_url
from runtime.serve_request import MAX_IMAGES, build_prompt, parse_messages
from runtime.session import SessionConfig

from .serve_util import (
    LiveServer,
    chat_body,
    cli_answer,
    data_uri,
    post_stream,
    sse_events,
    streamed,
)

PROMPT = "What is in the image?"
TOKENS = 12
CPU = SessionConfig("cpu")


def _until(check, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def bundle(llava_bundle):
    return llava_bundle("16norm")


@pytest.fixture(scope="module")
def ref_pipe(bundle):
    """A pipeline for reference answers: never the served one (its sessions are the worker's)."""
    return Pipeline(bundle, CPU)


@pytest.fixture(scope="module")
def files(tmp_path_factory, photo_paths):
    """An allowed folder with a photo and a symlink to a photo outside it."""
    allowed = tmp_path_factory.mktemp("allowed")
    shutil.copy(photo_paths[1], allowed / "photo.jpg")
    outside = tmp_path_factory.mktemp("outside") / "secret.jpg"
    shutil.copy(photo_paths[1], outside)
    (allowed / "link.jpg").symlink_to(outside)
    return allowed, outside


@pytest.fixture(scope="module")
def live(bundle, files):
    limits = ImageLimits(2 * 2**20, 2_000_000, (files[0].resolve(),))
    app = make_app(Pipeline(bundle, CPU), max_batch=4, queue_limit=6, batch_wait_ms=20,
                   limits=limits)  # fmt: skip
    server = LiveServer(app)
    server.engine = app.state.server.engine
    yield server
    server.stop()


def _post(live, body, **kw) -> httpx.Response:
    return httpx.post(f"{live.url}/v1/chat/completions", json=body, timeout=60, **kw)


def _reference(pipe: Pipeline, image, prompt: str, s: Sampling) -> str:
    """The answer `runtime.run -i IMAGE -p PROMPT` gives, computed the way it does."""
    pixels = pipe.preprocess([load_image(image)])
    ids = pipe.prompt_ids(prompt, pipe.image_tokens(pixels)[0])
    return pipe.generate(pixels, [ids], s)[0].text


def test_answers_equal_the_cli_streaming_and_not(live, bundle, photo_paths, capsys) -> None:
    ref = cli_answer(capsys, bundle, photo_paths[0], PROMPT, TOKENS)
    body = chat_body(data_uri(photo_paths[0]), PROMPT, max_tokens=TOKENS, model=bundle.name)
    r = _post(live, body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "chat.completion" and out["model"] == bundle.name
    choice = out["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": ref["text"]}
    assert choice["finish_reason"] == ("length" if len(ref["token_ids"]) == TOKENS else "stop")
    n_prompt, n_new = len(ref["prompt_token_ids"]), len(ref["token_ids"])
    assert n_prompt > 16  # the K image tokens are counted
    assert out["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": n_new,
                            "total_tokens": n_prompt + n_new}  # fmt: skip
    text, reason, usage = post_stream(live.url, body | {"stream_options": {"include_usage": True}})
    assert (text, reason, usage) == (ref["text"], choice["finish_reason"], out["usage"])


def test_several_images_equal_the_cli_one_prompt(live, bundle, photo_paths, capsys) -> None:
    """Two image_url parts before the text: `runtime.run -i A -i B --one-prompt -p TEXT`."""
    pair = [photo_paths[0], photo_paths[2]]
    ref = cli_answer(capsys, bundle, pair, "Compare them.", TOKENS)
    body = chat_body(data_uri(pair[0]), "Compare them.", max_tokens=TOKENS)
    body["messages"][0]["content"].insert(1, body["messages"][0]["content"][0] | {
        "image_url": {"url": data_uri(pair[1])}})  # fmt: skip
    r = _post(live, body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["choices"][0]["message"]["content"] == ref["text"]
    assert out["usage"]["prompt_tokens"] == len(ref["prompt_token_ids"])
    assert post_stream(live.url, body)[0] == ref["text"]


def test_models_and_health(live, bundle) -> None:
    models = httpx.get(f"{live.url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == [bundle.name]
    health = httpx.get(f"{live.url}/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_local_files_only_under_allowed_dirs(live, files, bundle, photo_paths, capsys) -> None:
    allowed, _ = files
    ref = cli_answer(capsys, bundle, photo_paths[1], PROMPT, TOKENS)
    for url in (str(allowed / "photo.jpg"), (allowed / "photo.jpg").as_uri()):
        r = _post(live, chat_body(url, PROMPT, max_tokens=TOKENS))
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == ref["text"]


def test_stop_cuts_the_answer_before_the_stop_string(live, ref_pipe, photo_paths) -> None:
    full = _reference(ref_pipe, photo_paths[2], PROMPT, Sampling(24))
    i = next(i for i in range(4, len(full) - 3) if full[i : i + 3].isalpha())
    stop = full[i : i + 3]
    want = full[: full.find(stop)]
    for value in (stop, ["never-in-the-answer", stop]):
        body = chat_body(data_uri(photo_paths[2]), PROMPT, max_tokens=24, stop=value)
        choice = _post(live, body).json()["choices"][0]
        assert (choice["message"]["content"], choice["finish_reason"]) == (want, "stop")
        assert post_stream(live.url, body)[:2] == (want, "stop")


def test_conversation_renders_the_chat_template(live, ref_pipe, photo_paths) -> None:
    image = {"type": "image_url", "image_url": {"url": data_uri(photo_paths[0])}}
    messages = [
        {"role": "user", "content": [image, {"type": "text", "text": PROMPT}]},
        {"role": "assistant", "content": "Two cats on a sofa."},
        {"role": "user", "content": "What colour are they?"},
    ]
    texts = [PROMPT, "Two cats on a sofa.", "What colour are they?"]
    turns = [{"role": m["role"], "text": t} for m, t in zip(messages, texts, strict=True)]
    load = partial(load_url, limits=ImageLimits())
    media, ids = build_prompt(ref_pipe, parse_messages(messages), load)
    # the ids runtime.run's chat feeds for this conversation
    assert ids == ref_pipe.encode_with_image(chat_render(ref_pipe, turns), 16)
    image = rows.run(ref_pipe, [media])
    (want,) = ref_pipe.generate(None, [ids], Sampling(TOKENS), vision_out=image)
    r = _post(live, {"messages": messages, "max_tokens": TOKENS})
    assert r.json()["choices"][0]["message"]["content"] == want.text
    system = {"role": "system", "content": "Answer briefly."}
    r = _post(live, {"messages": [system, *messages], "max_tokens": 4})
    assert r.status_code == 200, r.text


def test_concurrent_requests_share_batches_and_match_single_answers(
    live, ref_pipe, photo_paths
) -> None:
    cases = [  # (photo, prompt, request parameters): 4 greedy, 2 sampled (one batch each)
        (photo_paths[0], PROMPT, {"max_tokens": 6}),
        (photo_paths[1], "Describe the scene.", {"max_tokens": 12, "stream": True}),
        (photo_paths[2], "What colour is the water?", {"max_tokens": 9}),
        (photo_paths[1], PROMPT, {"max_tokens": 12}),
        (photo_paths[2], PROMPT, {"max_tokens": 8, "temperature": 0.9, "top_p": 0.9, "seed": 1}),
        (photo_paths[0], PROMPT, {"max_tokens": 10, "temperature": 0.9, "top_p": 0.9, "seed": 3,
                                  "stream": True}),
    ]  # fmt: skip
    want = []
    for photo, prompt, p in cases:
        s = Sampling(p["max_tokens"], p.get("temperature", 0.0), 0, p.get("top_p", 1.0),
                     p.get("seed", 0))  # fmt: skip
        want.append(_reference(ref_pipe, photo, prompt, s))
    engine, got = live.engine, [None] * len(cases)
    batches = engine.stats.batches

    def ask(i: int) -> None:
        photo, prompt, p = cases[i]
        r = _post(live, chat_body(data_uri(photo), prompt, **p))
        assert r.status_code == 200, r.text
        got[i] = streamed(sse_events(r.text))[0] if p.get("stream") else (
            r.json()["choices"][0]["message"]["content"])  # fmt: skip

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(cases))]
    with engine.paused():  # every request waits, so they batch whatever the machine's load
        for t in threads:
            t.start()
        _until(lambda: engine.waiting == len(cases), "the requests to queue")
        r = _post(live, chat_body(data_uri(photo_paths[0]), PROMPT, max_tokens=2))
        assert r.status_code == 429 and r.headers["retry-after"]
        assert r.json()["error"]["type"] == "rate_limit_error"
        assert r.json()["error"]["code"] == "queue_full"
    for t in threads:
        t.join(timeout=60)
    assert got == want
    assert engine.stats.batches - batches == 2  # 6 requests, 2 decoder batches
    assert engine.stats.largest_batch == 4


def _png(width: int, height: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (90, 120, 200)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _b64(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def test_bad_requests_get_openai_errors(live, files, photo_paths) -> None:
    allowed, outside = files
    good = data_uri(photo_paths[1])
    jpeg = photo_paths[1].read_bytes()

    def ask(url=good, prompt=PROMPT, **p) -> dict:
        return chat_body(url, prompt, **({"max_tokens": 4} | p))

    many = ask()
    many["messages"][0]["content"] += many["messages"][0]["content"][:1] * MAX_IMAGES
    cases = {  # name: (body, status, code)
        "no image": ({"messages": [{"role": "user", "content": "Hi"}]}, 400, "missing_image"),
        "too many images": (many, 400, "too_many_images"),
        "broken data URI": (ask("data:image/png;base64,@@not base64@@"), 400, "invalid_image_url"),
        "data URI, not base64": (ask("data:image/png,abc"), 400, "invalid_image_url"),
        "not an image": (ask(_b64(b"hello, world")), 400, "invalid_image"),
        "truncated image": (ask(_b64(jpeg[:2000])), 400, "invalid_image"),
        "unknown model": (ask(model="gpt-4o"), 404, "model_not_found"),
        "oversized image (pixels)": (ask(_png(2000, 1500)), 413, "image_too_large"),
        "oversized image (bytes)": (ask(_b64(b"\x89PNG" + bytes(2_500_000))), 413,
                                    "image_too_large"),
        "prompt too long": (ask(prompt="word " * 2100), 400, "invalid_prompt"),
        "max_tokens past the context": (ask(max_tokens=5000), 400, "invalid_prompt"),
        "http URL": (ask("http://example.com/cat.png"), 400, "unsupported_url"),
        "https URL": (ask("https://example.com/cat.png"), 400, "unsupported_url"),
        "file outside the allowed dirs": (ask(str(outside)), 400, "file_not_allowed"),
        "symlink out of an allowed dir": (ask(str(allowed / "link.jpg")), 400, "file_not_allowed"),
        "system file": (ask("/etc/passwd"), 400, "file_not_allowed"),
        "relative path": (ask("photo.jpg"), 400, "file_not_allowed"),
        "missing file": (ask(str(allowed / "none.jpg")), 400, "invalid_image"),
        "max_tokens 0": (ask(max_tokens=0), 400, "invalid_value"),
        "max_tokens text": (ask(max_tokens="8"), 400, "invalid_value"),
        "temperature < 0": (ask(temperature=-0.5), 400, "invalid_value"),
        "top_p 0": (ask(top_p=0), 400, "invalid_value"),
        "top_p > 1": (ask(top_p=1.5), 400, "invalid_value"),
        "seed text": (ask(seed="x"), 400, "invalid_value"),
        "five stops": (ask(stop=["a", "b", "c", "d", "e"]), 400, "invalid_value"),
        "stop number": (ask(stop=3), 400, "invalid_value"),
        "n = 2": (ask(n=2), 400, "unsupported_parameter"),
        "no messages": ({"model": None}, 400, "invalid_value"),
        "assistant last": ({"messages": [{"role": "assistant", "content": "x"}]}, 400,
                           "invalid_value"),
        "unknown role": ({"messages": [{"role": "tool", "content": "x"}]}, 400, "invalid_value"),
        "unknown part": ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, 400,
                         "invalid_value"),
        "JSON array": ([1, 2], 400, "invalid_json"),
    }  # fmt: skip
    wrong = {}
    for name, (body, status, code) in cases.items():
        r = _post(live, body)
        err = r.json().get("error", {})
        if (r.status_code, err.get("code")) != (status, code) or set(err) != {
            "message",
            "type",
            "param",
            "code",
        }:
            wrong[name] = (r.status_code, r.text[:200])
    r = httpx.post(f"{live.url}/v1/chat/completions", content=b"{not json", timeout=10)
    if (r.status_code, r.json()["error"]["code"]) != (400, "invalid_json"):
        wrong["malformed JSON"] = (r.status_code, r.text)
    assert not wrong, wrong
    # the server is still there and answers
    assert _post(live, ask()).status_code == 200
    assert httpx.get(f"{live.url}/health").json()["status"] == "ok"


def test_clients_that_go_away_free_their_rows(live, photo_paths) -> None:
    engine, url = live.engine, f"{live.url}/v1/chat/completions"
    cancelled, tokens = engine.stats.cancelled, engine.stats.tokens
    body = chat_body(data_uri(photo_paths[0]), PROMPT, max_tokens=1500)  # seconds of decoding
    stream = body | {"stream": True}
    with httpx.Client(timeout=30) as client, client.stream("POST", url, json=stream) as r:
        assert r.status_code == 200
        next(line for line in r.iter_lines() if '"content": "' in line and '""' not in line)
    # closing the stream closed the connection: the row is marked done, the batch stops
    _until(lambda: engine.stats.cancelled == cancelled + 1 and engine.running == 0, "cancel")
    with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up
        httpx.post(url, json=body, timeout=httpx.Timeout(30, read=0.3))
    _until(lambda: engine.stats.cancelled == cancelled + 2 and engine.running == 0, "cancel")
    assert engine.stats.tokens - tokens < 1500  # neither ran to its max_tokens
    r = _post(live, chat_body(data_uri(photo_paths[0]), PROMPT, max_tokens=4))
    assert r.status_code == 200


def test_loading_answers_503_then_serves(bundle, photo_paths, monkeypatch, tmp_path) -> None:
    gate, real = threading.Event(), serve.open_pipeline

    def slow_open(*args):
        gate.wait(30)
        return real(*args)

    monkeypatch.setattr(serve, "open_pipeline", slow_open)
    body = chat_body(data_uri(photo_paths[0]), PROMPT, max_tokens=2)
    with TestClient(make_app(bundle, cfg=CPU)) as client:
        assert client.get("/health").status_code == 503
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_ready"
        gate.set()
        _until(lambda: client.get("/health").status_code == 200, "the model to load")
        assert client.post("/v1/chat/completions", json=body).status_code == 200
    with TestClient(make_app(tmp_path, cfg=CPU)) as client:  # not a bundle: reported, not fatal
        _until(lambda: client.get("/health").json()["status"] == "error", "the load to fail")
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 503 and "failed to load" in r.json()["error"]["message"]


def test_qwen_bundle_answers_as_the_cli(qwen_bundle, photo_paths, capsys) -> None:
    bundle = qwen_bundle("16")
    ref = cli_answer(capsys, bundle, photo_paths[2], PROMPT, TOKENS)
    body = chat_body(data_uri(photo_paths[2]), PROMPT, max_tokens=TOKENS)
    with TestClient(make_app(Pipeline(bundle, CPU))) as client:
        out = client.post("/v1/chat/completions", json=body).json()
        assert out["choices"][0]["message"]["content"] == ref["text"]
        assert out["usage"]["prompt_tokens"] == len(ref["prompt_token_ids"])
        r = client.post("/v1/chat/completions", json=body | {"stream": True})
        assert streamed(sse_events(r.text))[0] == ref["text"]


# The stub records the python calls; the path query answers OUT (as the export CLI does) without
# importing torch.
SERVE_STUB = """#!/bin/sh
case " $* " in
  *" --print-out "*) while [ "$1" != "-o" ]; do shift; done; echo "$2" ;;
  *) echo "PY $*" ;;
esac
"""


@pytest.mark.parametrize(
    ("target", "variables", "expected"),
    [
        ("serve", {"PORT": "9000", "PROVIDER": "cpu"}, "-m runtime.serve -m {out} --port 9000 "
         "--provider cpu"),
        ("serve-ray", {"RAY_ADDRESS": "head:6379", "REPLICAS": "2"},
         "-m runtime.serve_ray -m {out} --address head:6379 --replicas 2"),
    ],
)  # fmt: skip
def test_make_serve_targets(tmp_path, target: str, variables: dict, expected: str) -> None:
    """`make serve` / `make serve-ray` serve the bundle of the export variables (OUT here)."""
    import os
    import subprocess

    from runtime import contract as C

    from .conftest import REPO

    if shutil.which("make") is None:
        pytest.skip("no `make` on this machine")
    stub, out = tmp_path / "py", tmp_path / "bundle"
    stub.write_text(SERVE_STUB)
    stub.chmod(0o755)
    out.mkdir()
    (out / C.MANIFEST_FILE).write_text("{}")  # exists: no export
    names = ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "K", "MODEL", "PRESET", "DTYPE", "OUT", "PORT",
             "RAY_ADDRESS")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in names}
    args = [f"{k}={v}" for k, v in {"PY": stub, "STAMP": "", "OUT": out, **variables}.items()]
    proc = subprocess.run(["make", "-s", "--no-print-directory", "-C", str(REPO), target, *args],
                          capture_output=True, text=True, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert " ".join(proc.stdout.split()) == "PY " + expected.format(out=out)
