"""python -m runtime.serve: an OpenAI-compatible HTTP endpoint over a bundle (FastAPI + uvicorn).

    python -m runtime.serve -m build/tiny-llava-k16 [--host 127.0.0.1] [--port 8080]
    POST /v1/chat/completions   messages with text + image_url parts (data URI, or a file under
                                --allowed-dir), stream (SSE), max_tokens, temperature, top_p,
                                seed, stop; usage counts the image tokens
    GET  /v1/models             the bundle's folder name is the model id
    GET  /health                200 when the model is loaded, 503 while loading

Requests that arrive together are decoded in one batch (runtime.serve_batch); a client that
disconnects frees its row. Bad requests get OpenAI-style errors with a 4xx status; the server
never fetches from the network. Needs the `serve` extra (fastapi, uvicorn) beside the runtime.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from runtime.bundle import BundleError, load_manifest
from runtime.generate import Pipeline, PromptError
from runtime.mrope import PositionError
from runtime.preprocess import ImageError
from runtime.qwen_vision_inputs import GridError
from runtime.serve_batch import Engine, Finish, Job, QueueFullError
from runtime.serve_images import ImageLimits, load_url
from runtime.serve_request import (
    ChatRequest,
    RequestError,
    build_prompt,
    parse_request,
)
from runtime.session import OPT_LEVELS, PROVIDER_CHOICES, SessionConfig

OWNER = "svdprune-onnx"


def error_for(e: BaseException) -> RequestError:
    """Any failure of a request as the RequestError the client gets."""
    if isinstance(e, RequestError):
        return e
    if isinstance(e, PromptError | PositionError):
        return RequestError(400, str(e), "messages", "invalid_prompt")
    if isinstance(e, ImageError | GridError):  # GridError: an image Qwen2.5-VL's grid refuses
        return RequestError(400, str(e), "messages", "invalid_image")
    if isinstance(e, QueueFullError):
        return RequestError(429, str(e), None, "queue_full", "rate_limit_error")
    return RequestError(
        500,
        f"internal error ({type(e).__name__}: {e}); see the server log",
        None,
        None,
        "server_error",
    )


def error_response(e: BaseException) -> JSONResponse:
    err = error_for(e)
    headers = {"Retry-After": "1"} if err.status in (429, 503) else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def open_pipeline(bundle: Path, cfg: SessionConfig) -> Pipeline:
    """The bundle's Pipeline after its self-test on this device, as `runtime.run` opens it."""
    from runtime.selftest import ensure_selftest

    pipe = Pipeline(bundle, cfg)
    ensure_selftest(pipe, cfg)
    return pipe


class Server:
    """What the routes share: the pipeline and its engine once loaded, limits, the model id."""

    def __init__(self, model_id: str, limits: ImageLimits, max_new_tokens: int) -> None:
        self.model_id, self.limits, self.max_new_tokens = model_id, limits, max_new_tokens
        self.pipe: Pipeline | None = None
        self.engine: Engine | None = None
        self.load_error: str | None = None
        # image decoding and preprocessing off the event loop, a few at a time (memory)
        self.decode_limiter = anyio.CapacityLimiter(max(2, os.cpu_count() or 2))
        self.created = int(time.time())

    def start(self, pipe: Pipeline, engine_options: dict) -> None:
        self.engine = Engine(pipe, **engine_options)
        self.pipe = pipe

    def load(self, bundle: Path, cfg: SessionConfig, engine_options: dict) -> None:
        """Open the bundle in a thread (/health says 503 meanwhile)."""
        try:
            self.start(open_pipeline(bundle, cfg), engine_options)
            print(f"serving {self.model_id}", file=sys.stderr, flush=True)
        except Exception as e:  # reported by /health and every request, not a dead server
            self.load_error = f"{type(e).__name__}: {e}"
            print(f"error: cannot load {bundle}: {e}", file=sys.stderr, flush=True)

    def ready(self) -> Engine:
        if self.engine is None:
            message = "the model is loading; retry shortly"
            if self.load_error:
                message = f"the model failed to load ({self.load_error}); see the server log"
            raise RequestError(503, message, None, "model_not_ready", "service_unavailable")
        return self.engine

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()


def make_app(
    pipe_or_bundle: Pipeline | Path | str,
    *,
    cfg: SessionConfig | None = None,
    max_batch: int = 8,
    queue_limit: int = 64,
    batch_wait_ms: float = 10.0,
    limits: ImageLimits | None = None,
    max_new_tokens: int = 128,
) -> FastAPI:
    """The FastAPI app. A Pipeline serves at once; a bundle path loads in a thread at start-up
    (uvicorn's lifespan), answering 503 until it is ready."""
    engine_options = {
        "max_batch": max_batch,
        "queue_limit": queue_limit,
        "batch_wait_ms": batch_wait_ms,
    }
    given = isinstance(pipe_or_bundle, Pipeline)
    bundle = pipe_or_bundle.bundle if given else Path(pipe_or_bundle)
    server = Server(bundle.resolve().name, limits or ImageLimits(), max_new_tokens)
    if given:
        server.start(pipe_or_bundle, engine_options)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not given:
            args = (bundle, cfg or SessionConfig(), engine_options)
            threading.Thread(target=server.load, args=args, daemon=True).start()
        yield
        server.close()

    app = FastAPI(title=OWNER, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server

    async def _refused(request: Request, e: Exception) -> JSONResponse:
        return error_response(e)

    for known in (RequestError, PromptError, PositionError, ImageError, GridError, QueueFullError):
        app.add_exception_handler(known, _refused)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, e: HTTPException) -> JSONResponse:
        err = RequestError(e.status_code, str(e.detail), None, None)
        return JSONResponse(err.body(), status_code=e.status_code)

    app.add_exception_handler(Exception, _refused)  # a 500 in the OpenAI shape (and the log)

    @app.get("/health")
    async def health() -> JSONResponse:
        if server.engine is None or not server.engine.alive():
            status = "error" if server.load_error else "loading"
            body = {"status": status, "model": server.model_id, "error": server.load_error}
            return JSONResponse(body, status_code=503)
        engine = server.engine
        return JSONResponse(
            {
                "status": "ok",
                "model": server.model_id,
                "waiting": engine.waiting,
                "running": engine.running,
                "stats": vars(engine.stats),
            }
        )

    @app.get("/v1/models")
    async def models() -> dict:
        return {
            "object": "list",
            "data": [
                {
                    "id": server.model_id,
                    "object": "model",
                    "created": server.created,
                    "owned_by": OWNER,
                }
            ],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        engine = server.ready()
        body = await _read_body(request, server.limits.max_request_bytes)
        req = parse_request(body, server.model_id, server.max_new_tokens)
        load = partial(load_url, limits=server.limits)
        media, ids = await anyio.to_thread.run_sync(
            build_prompt, server.pipe, req.messages, load, limiter=server.decode_limiter
        )
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        sink = partial(loop.call_soon_threadsafe, queue.put_nowait)  # from the worker thread
        seed = secrets.randbits(31) if req.seed is None else req.seed  # none: not reproducible
        job = Job(ids, media, req.max_tokens, sink, req.temperature, req.top_p, seed, req.stop,
                  req.stream)  # fmt: skip
        engine.submit(job)
        events = _events(request, queue, job, engine)
        first = await anext(events, None)  # after the prefill: an error is still a 4xx
        if first is None:
            return Response(status_code=499)  # the client is gone; nobody reads this
        if first[0] == "error":
            await events.aclose()
            return error_response(first[1])
        reply = _Reply(server.model_id, req)
        if req.stream:
            return StreamingResponse(
                reply.sse(events),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        try:
            async for kind, value in events:
                if kind == "error":
                    return error_response(value)
                if kind == "end":
                    return JSONResponse(reply.completion(value))
        finally:
            await events.aclose()
        return Response(status_code=499)

    return app


async def _read_body(request: Request, limit: int):
    """The JSON body, refused past `limit` bytes (read in chunks: no unbounded buffer)."""
    if int(request.headers.get("content-length") or 0) > limit:
        raise RequestError(413, f"request body over {limit} bytes", None, "request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"request body over {limit} bytes", None, "request_too_large")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(400, f"the body is not valid JSON ({e})", None, "invalid_json") from e


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read by then)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _events(request: Request, queue: asyncio.Queue, job: Job, engine: Engine):
    """The job's events until its end; a client that goes away (or a cancelled task: a streaming
    client that disconnects, a Ray Serve request cancelled) cancels the job, freeing its row."""
    gone = asyncio.ensure_future(_disconnected(request))
    over = False
    try:
        while True:
            get = asyncio.ensure_future(queue.get())
            await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not get.done():
                get.cancel()
                return
            event = get.result()
            over = event[0] in ("end", "error")
            yield event
            if over:
                return
    finally:
        gone.cancel()
        if not over:
            engine.cancel(job)


class _Reply:
    """OpenAI response objects for one request."""

    def __init__(self, model_id: str, req: ChatRequest) -> None:
        self.id, self.created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        self.model, self.req = model_id, req

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    @staticmethod
    def usage(f: Finish) -> dict:
        return {
            "prompt_tokens": f.prompt_tokens,
            "completion_tokens": f.completion_tokens,
            "total_tokens": f.prompt_tokens + f.completion_tokens,
        }

    def completion(self, f: Finish) -> dict:
        message = {"role": "assistant", "content": f.text}
        choice = {
            "index": 0,
            "message": message,
            "logprobs": None,
            "finish_reason": f.finish_reason,
        }
        return self._head("chat.completion") | {"choices": [choice], "usage": self.usage(f)}

    def chunk(self, delta: dict, finish_reason: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return self._sse(self._head("chat.completion.chunk") | {"choices": [choice]})

    @staticmethod
    def _sse(obj: dict) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    async def sse(self, events) -> AsyncIterator[str]:
        """`data: {chunk}` per piece of text, the finish reason, (usage), `data: [DONE]`."""
        try:
            yield self.chunk({"role": "assistant", "content": ""})
            async for kind, value in events:
                if kind == "delta":
                    yield self.chunk({"content": value})
                elif kind == "error":  # the status is sent already: an error object instead
                    yield self._sse(error_for(value).body())
                    break
                elif kind == "end":
                    yield self.chunk({}, value.finish_reason)
                    if self.req.include_usage:
                        yield self._sse(
                            self._head("chat.completion.chunk")
                            | {"choices": [], "usage": self.usage(value)}
                        )
            yield "data: [DONE]\n\n"
        finally:
            await events.aclose()


# --- command line ----------------------------------------------------------------------------
def add_server_args(ap: argparse.ArgumentParser) -> None:
    """Flags shared with runtime.serve_ray (runtime.run's names where they exist)."""
    ap.add_argument("-m", "--model", type=Path, required=True, help="bundle folder (make export)")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--provider", choices=PROVIDER_CHOICES, default="auto")
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (0: ORT default)")
    ap.add_argument("--opt-level", choices=tuple(OPT_LEVELS), default="all")
    ap.add_argument("--fp16", action="store_true", help="TensorRT fp16 for the vision graph")
    ap.add_argument(
        "--max-new-tokens",
        type=int,
        default=128,
        help="max_tokens of a request that does not set it",
    )
    ap.add_argument("--max-batch", type=int, default=8, help="requests per decoder batch")
    ap.add_argument(
        "--queue-limit", type=int, default=64, help="requests waiting for a batch before 429"
    )
    ap.add_argument(
        "--batch-wait-ms",
        type=float,
        default=10.0,
        help="how long the first request of a batch waits for company",
    )
    ap.add_argument(
        "--allowed-dir",
        type=Path,
        action="append",
        default=[],
        help="folder whose image files requests may name (default: none)",
    )
    ap.add_argument("--max-image-mb", type=float, default=20.0, help="encoded bytes per image")
    ap.add_argument("--max-image-pixels", type=int, default=ImageLimits.max_pixels)


def check_server_args(args: argparse.Namespace) -> None:
    """Refuse unusable values before anything loads (ValueError naming the flag)."""
    checks = [
        (args.max_new_tokens >= 1, "--max-new-tokens must be >= 1"),
        (args.max_batch >= 1, "--max-batch must be >= 1"),
        (args.queue_limit >= 1, "--queue-limit must be >= 1"),
        (args.batch_wait_ms >= 0, "--batch-wait-ms must be >= 0"),
        (args.threads >= 0, "--threads must be >= 0 (0 = ORT default)"),
        (args.max_image_mb > 0 and args.max_image_pixels > 0, "image limits must be > 0"),
        (0 <= args.port < 65536, "--port must be in 0..65535"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    for d in args.allowed_dir:
        if not d.is_dir():
            raise ValueError(f"--allowed-dir {d} is not a folder")
    load_manifest(args.model)  # a wrong path fails here, with the fix, not in a thread later


def app_options(args: argparse.Namespace) -> dict:
    """make_app's keyword arguments from the shared flags."""
    limits = ImageLimits(
        int(args.max_image_mb * 2**20),
        args.max_image_pixels,
        tuple(d.resolve() for d in args.allowed_dir),
    )
    return {
        "cfg": SessionConfig(args.provider, args.threads, args.opt_level, args.fp16),
        "max_batch": args.max_batch,
        "queue_limit": args.queue_limit,
        "batch_wait_ms": args.batch_wait_ms,
        "limits": limits,
        "max_new_tokens": args.max_new_tokens,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m runtime.serve", description=__doc__.splitlines()[0]
    )
    add_server_args(ap)
    args = ap.parse_args(argv)
    try:
        check_server_args(args)
    except (BundleError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import uvicorn

    app = make_app(args.model, **app_options(args))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
