"""An OpenAI chat-completions request -> what the engine runs: checked parameters, image, ids.

    JSON body ─► parse_request ─► ChatRequest (messages as Message(role, parts), sampling, stop)
    build_prompt(pipe, messages, load) ─► (media, prompt ids): the one place that maps messages
        to the ids `python -m runtime.run` feeds (-p for one user turn, else the chat template);
        `load` turns an image_url into a PIL image (runtime.serve_images.load_url)

Every refusal is a RequestError: an HTTP status and an OpenAI-style error naming the fix.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PIL import Image

from runtime import rows
from runtime.generate import Pipeline

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOP = 4  # OpenAI's limit on stop sequences
# Parameters this server cannot honour: refused unless they hold their no-op value.
UNSUPPORTED = {
    "n": (None, 1),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "functions": (None, []),
}
MAX_IMAGES = 16  # images one request may carry (each is preprocessed before the context check)
IMAGE_PART = '{"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,..."}}'


class RequestError(ValueError):
    """A request the server refuses: HTTP `status` and the OpenAI error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = (
            status, message, param, code, kind,
        )  # fmt: skip

    def body(self) -> dict:
        return {
            "error": {"message": self.message, "type": self.kind, "param": self.param,
                      "code": self.code},
        }  # fmt: skip


def bad(message: str, param: str | None = "messages", code: str = "invalid_value") -> RequestError:
    """A 400 invalid_request_error."""
    return RequestError(400, message, param, code)


@dataclass(frozen=True)
class Message:
    role: str  # system | user | assistant
    parts: tuple[tuple[str, str], ...]  # ("text", text) | ("image", url), in request order

    def text(self) -> str:
        return "\n".join(v for kind, v in self.parts if kind == "text")


@dataclass(frozen=True)
class ChatRequest:
    messages: tuple[Message, ...]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


def parse_request(body: Any, model_id: str, default_max_tokens: int) -> ChatRequest:
    """Check a decoded JSON body; RequestError names the parameter and its valid values."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", None, "invalid_json")
    model = body.get("model")
    if model is not None and model != model_id:
        message = f"model {model!r} is not served here; use {model_id!r} (GET /v1/models)"
        raise RequestError(404, message, "model", "model_not_found")
    for name, allowed in UNSUPPORTED.items():
        if body.get(name) not in allowed:
            raise bad(f"{name} is not supported by this server; leave it out", name,
                      "unsupported_parameter")  # fmt: skip
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = default_max_tokens if max_tokens is None else max_tokens
    # greedy unless asked (OpenAI's default is 1.0): the answer equals `runtime.run`'s
    temperature = 0.0 if body.get("temperature") is None else body["temperature"]
    top_p = 1.0 if body.get("top_p") is None else body["top_p"]
    seed, options = body.get("seed"), body.get("stream_options") or {}
    checks = [
        ("max_tokens", _is_int(max_tokens) and max_tokens >= 1, "an integer >= 1"),
        ("temperature", _is_num(temperature) and temperature >= 0, "a number >= 0 (0 = greedy)"),
        ("top_p", _is_num(top_p) and 0 < top_p <= 1, "a number in (0, 1]"),
        ("seed", seed is None or _is_int(seed), "an integer"),
        ("stream", isinstance(body.get("stream", False), bool), "true or false"),
        ("stream_options", isinstance(options, dict), 'an object like {"include_usage": true}'),
    ]
    for name, ok, valid in checks:
        if not ok:
            raise bad(f"{name} must be {valid}", name)
    return ChatRequest(
        messages=parse_messages(body.get("messages")),
        max_tokens=int(max_tokens),
        temperature=float(temperature),
        top_p=float(top_p),
        seed=None if seed is None else int(seed),
        stop=_stop(body.get("stop")),
        stream=bool(body.get("stream", False)),
        include_usage=bool(options.get("include_usage", False)),
    )


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _stop(stop: Any) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else stop or []
    if (
        not isinstance(stops, list)
        or len(stops) > MAX_STOP
        or not all(isinstance(s, str) and s for s in stops)
    ):
        raise bad(f"stop must be a non-empty string or a list of up to {MAX_STOP}", "stop")
    return tuple(stops)


def parse_messages(messages: Any) -> tuple[Message, ...]:
    """OpenAI messages -> Messages; content is a string or a list of text / image_url parts."""
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list of {role, content}")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise bad(f"{where} needs a role out of {sorted(ROLES)}", where)
        content = m.get("content")
        items = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(items, list):
            raise bad(f"{where}.content must be a string or a list of parts", f"{where}.content")
        parts = tuple(_part(p, f"{where}.content[{j}]") for j, p in enumerate(items))
        out.append(Message(ROLES[m["role"]], parts))
    if out[-1].role != "user":
        raise bad("the last message must be the user's (the server answers it)")
    return tuple(out)


def _part(part: Any, where: str) -> tuple[str, str]:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):
        return ("text", part["text"])
    if kind == "image_url":
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
        if isinstance(url, str):
            return ("image", url)
    raise bad(f'{where} must be {{"type": "text", "text": ...}} or {IMAGE_PART}', where)


# --- the prompt ------------------------------------------------------------------------------
def build_prompt(
    pipe: Pipeline, messages: tuple[Message, ...], load: Callable[[str], Image.Image]
) -> tuple[list, list[int]]:
    """(media: the request's images as runtime.rows Items, in order; prompt ids) for `messages`.

    One user message with one image: `pipe.prompt_ids(text, k)`, the ids of `runtime.run -i IMG
    -p TEXT`; anything else (several images, a conversation): the bundle's chat template with
    each image where the request puts it (`runtime.run --one-prompt`'s ids for one message)."""
    images = [(i, url) for i, m in enumerate(messages) for kind, url in m.parts if kind == "image"]
    if not images:
        raise bad(f"this model answers about an image: add an {IMAGE_PART} part",
                  code="missing_image")  # fmt: skip
    if len(images) > MAX_IMAGES:
        raise bad(f"{len(images)} images in one request; send at most {MAX_IMAGES}",
                  code="too_many_images")  # fmt: skip
    for where, _ in images:
        if messages[where].role != "user":
            raise bad(f"an image must be in a user message, not messages[{where}]")
    (media,) = rows.prepare(pipe, [[load(url) for _, url in images]])
    if len(messages) == 1 and not messages[0].text().strip():
        raise bad("the user message has no text; ask a question about the image")
    if len(messages) == 1 and len(media) == 1:
        return media, pipe.prompt_ids(messages[0].text(), media[0].tokens)
    return media, rows.encode(pipe, render(pipe, messages), rows.slots(pipe, media))


def render(pipe: Pipeline, messages: tuple[Message, ...]) -> str:
    """The conversation in the bundle's chat template (runtime.chat.render), each part where the
    request puts it, so a system message or an image in a later turn renders as HF would."""
    from runtime.chat import render as chat_render
    from runtime.generate import PromptError

    chat = [
        {"role": m.role, "content": [_template_part(kind, value) for kind, value in m.parts]}
        for m in messages
    ]
    try:
        return chat_render(pipe, chat)
    except PromptError as e:  # no chat template
        raise bad(f"{e}: send a single user message with one image") from e


def _template_part(kind: str, value: str) -> dict:
    return {"type": "image"} if kind == "image" else {"type": "text", "text": value}
