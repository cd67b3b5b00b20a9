"""runtime.serve_ray: the serving app as a Ray Serve deployment on a local Ray instance (started
on 127.0.0.1 by the fixture, shut down after) answers as the single server and the CLI do."""

from __future__ import annotations

import httpx
import pytest

from runtime import serve_ray
from runtime.serve import app_options

from .serve_util import chat_body, cli_answer, data_uri, free_port, post_stream

pytest.importorskip("ray", reason="Ray Serve is the optional `ray` extra")

PROMPT = "What is in the image?"
TOKENS = 12


@pytest.fixture(scope="module")
def ray_app(llava_bundle):
    """One replica of the tiny bundle on a local Ray instance; its URL."""
    import ray
    from ray import serve

    bundle, port = llava_bundle("16norm"), free_port()
    mp = pytest.MonkeyPatch()
    mp.delenv("RAY_ADDRESS", raising=False)  # always a local instance, never a user's cluster
    argv = ["-m", str(bundle), "--provider", "cpu", "--port", str(port), "--num-cpus", "2"]
    args = serve_ray.parse_args(argv)
    try:
        assert serve_ray.start_ray(args)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = serve_ray.deployment(args.model, app_options(args), serve_ray.ray_options(args))
        serve.run(app, name=serve_ray.APP_NAME, route_prefix="/")
        yield f"http://127.0.0.1:{port}", bundle
    finally:
        serve.shutdown()
        ray.shutdown()
        mp.undo()


def test_ray_serve_answers_as_the_single_server(ray_app, photo_paths, capsys) -> None:
    url, bundle = ray_app
    ref = cli_answer(capsys, bundle, photo_paths[0], PROMPT, TOKENS)
    body = chat_body(data_uri(photo_paths[0]), PROMPT, max_tokens=TOKENS)
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["choices"][0]["message"]["content"] == ref["text"]
    assert out["usage"]["prompt_tokens"] == len(ref["prompt_token_ids"])
    text, _, usage = post_stream(url, body | {"stream_options": {"include_usage": True}})
    assert (text, usage) == (ref["text"], out["usage"])
    assert httpx.get(f"{url}/v1/models").json()["data"][0]["id"] == bundle.name
    r = httpx.post(f"{url}/v1/chat/completions", json=body | {"model": "x"}, timeout=60)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_replica_and_autoscaling_options() -> None:
    base = ["-m", "b", "--max-batch", "4", "--queue-limit", "8"]
    fixed = serve_ray.ray_options(serve_ray.parse_args([*base, "--replicas", "2"]))
    assert fixed["num_replicas"] == 2 and fixed["max_ongoing_requests"] == 12
    scaled = serve_ray.ray_options(serve_ray.parse_args([*base, "--min-replicas", "1",
                                                         "--max-replicas", "3"]))  # fmt: skip
    assert "num_replicas" not in scaled
    assert scaled["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 3,
                                            "target_ongoing_requests": 4}  # fmt: skip
    with pytest.raises(ValueError, match="min-replicas"):
        serve_ray.ray_options(serve_ray.parse_args([*base, "--min-replicas", "3",
                                                    "--max-replicas", "2"]))  # fmt: skip
