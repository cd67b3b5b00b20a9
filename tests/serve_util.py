"""Helpers of the serving tests: request bodies, SSE parsing, the CLI's answer, a live server."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from pathlib import Path

import httpx


def data_uri(path: Path) -> str:
    kind = "png" if path.suffix == ".png" else "jpeg"
    return f"data:image/{kind};base64,{base64.b64encode(path.read_bytes()).decode()}"


def chat_body(url: str, prompt: str, **params) -> dict:
    """One user message holding the image and the question (the CLI's -p path)."""
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": prompt}]
    return {"messages": [{"role": "user", "content": content}], **params}


def sse_events(text: str) -> list:
    """The `data:` payloads of an SSE body, JSON-decoded ("[DONE]" stays a string)."""
    out = []
    for block in text.split("\n\n"):
        if block.startswith("data: "):
            payload = block[len("data: ") :]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def streamed(events: list) -> tuple[str, str | None, dict | None]:
    """(text, finish_reason, usage) of a streamed answer."""
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if e.get("choices")]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    usage = next((e["usage"] for e in events[:-1] if e.get("usage")), None)
    return text, chunks[-1]["choices"][0]["finish_reason"], usage


def post_stream(url: str, body: dict, timeout: float = 60) -> tuple[str, str | None, dict | None]:
    r = httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=timeout)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    return streamed(sse_events(r.text))


def cli_answer(capsys, bundle: Path, image: Path | list[Path], prompt: str, tokens: int) -> dict:
    """`python -m runtime.run -m B -i IMG -p TEXT --json`'s answer (in process); several images:
    `-i A -i B --one-prompt`."""
    from runtime.run import cli

    capsys.readouterr()
    several = isinstance(image, list)
    images = [a for im in (image if several else [image]) for a in ("-i", str(im))]
    argv = ["-m", str(bundle), *images, "-p", prompt, "--provider", "cpu", "--json"]
    argv += ["--one-prompt"] if several else []
    assert cli([*argv, "--max-new-tokens", str(tokens)]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """An app under uvicorn in a thread, on a free 127.0.0.1 port (real sockets: streaming and
    disconnects behave as over the network)."""

    def __init__(self, app) -> None:
        import uvicorn

        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
