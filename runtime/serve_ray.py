"""python -m runtime.serve_ray: the same OpenAI-compatible app on Ray Serve, N replicas.

    python -m runtime.serve_ray -m build/tiny-llava-k16 [--replicas 2] [--port 8000]
    python -m runtime.serve_ray -m BUNDLE --address HEAD:6379     # an existing cluster
    python -m runtime.serve_ray -m BUNDLE --min-replicas 1 --max-replicas 4   # autoscaling

Each replica owns one Pipeline and its batching engine (runtime.serve.make_app through
`@serve.ingress`, so routes, errors and streaming are the single server's); Ray Serve's proxy
spreads requests over the replicas. Without --address (or RAY_ADDRESS) a local Ray instance is
started on 127.0.0.1 (no dashboard, a small object store) and shut down on exit; with one, the
app is deployed onto that cluster and deleted on exit. Every node that runs a replica needs this
package installed and the bundle at the same path. Ray is imported here only, lazily: the device
runtime never needs it (the `ray` extra).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from runtime.bundle import BundleError
from runtime.serve import (
    add_server_args,
    app_options,
    check_server_args,
    make_app,
    open_pipeline,
)

APP_NAME = "svdprune"
LOCAL_OBJECT_STORE = 100 * 2**20  # the app passes no large objects through Ray


def deployment(bundle: Path, options: dict, ray_options: dict):
    """The bound Ray Serve application: replicas of make_app over a Pipeline of `bundle`.

    options: make_app's keyword arguments (app_options); ray_options: serve.deployment's
    (num_replicas or autoscaling_config, ray_actor_options, max_ongoing_requests)."""
    from ray import serve

    @serve.ingress()
    class SvdpruneReplica:
        """One replica: a Pipeline, its engine and the FastAPI app."""

        def __init__(self, bundle: str, options: dict) -> None:
            self._app = make_app(open_pipeline(Path(bundle), options["cfg"]), **options)

        def __serve_build_asgi_app__(self):
            return self._app

        def check_health(self) -> None:
            if not self._app.state.server.engine.alive():
                raise RuntimeError("the batching engine's worker thread stopped")

    return serve.deployment(SvdpruneReplica, name=APP_NAME, **ray_options).bind(
        str(bundle.resolve()), options
    )


def ray_options(args: argparse.Namespace) -> dict:
    """serve.deployment options from the flags: fixed replicas or an autoscaling range."""
    opts = {
        "ray_actor_options": {"num_cpus": args.replica_cpus},
        # the replica's own queue answers 429 past --queue-limit, as the single server does
        "max_ongoing_requests": args.max_batch + args.queue_limit,
    }
    if args.min_replicas is None and args.max_replicas is None:
        return opts | {"num_replicas": args.replicas}
    low = args.min_replicas if args.min_replicas is not None else 1
    high = args.max_replicas if args.max_replicas is not None else max(low, args.replicas)
    if not 0 <= low <= high or high < 1:
        raise ValueError(f"need 0 <= --min-replicas <= --max-replicas, >= 1; got {low}, {high}")
    target = args.target_ongoing_requests or args.max_batch
    scaling = {"min_replicas": low, "max_replicas": high, "target_ongoing_requests": target}
    return opts | {"autoscaling_config": scaling}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m runtime.serve_ray",
                                 description=__doc__.splitlines()[0])  # fmt: skip
    add_server_args(ap)
    ap.set_defaults(port=8000)  # Ray Serve's usual port
    ap.add_argument("--address", help="an existing Ray cluster (default: $RAY_ADDRESS, else a "
                    "local one on 127.0.0.1)")  # fmt: skip
    ap.add_argument("--replicas", type=int, default=1, help="replicas, each with one pipeline")
    ap.add_argument("--min-replicas", type=int, help="autoscaling: lower bound")
    ap.add_argument("--max-replicas", type=int, help="autoscaling: upper bound")
    ap.add_argument("--target-ongoing-requests", type=float,
                    help="autoscaling: requests per replica (default: --max-batch)")  # fmt: skip
    ap.add_argument("--replica-cpus", type=float, default=1.0, help="Ray CPUs per replica")
    ap.add_argument("--num-cpus", type=int, help="CPUs of a local Ray instance "
                    "(default: enough for the replicas)")  # fmt: skip
    return ap.parse_args(argv)


def start_ray(args: argparse.Namespace) -> bool:
    """Connect to --address / RAY_ADDRESS, or start a local instance; True if local."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no network at run time
    import ray

    address = args.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
        return False
    replicas = max(args.replicas, args.max_replicas or 0)
    cpus = args.num_cpus or max(2, int(replicas * args.replica_cpus + 0.999))
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False,
             object_store_memory=LOCAL_OBJECT_STORE, _node_ip_address="127.0.0.1")  # fmt: skip
    return True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_server_args(args)
        options, ray_opts = app_options(args), ray_options(args)
        if args.replicas < 1:
            raise ValueError("--replicas must be >= 1")
    except (BundleError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    local = start_ray(args)
    from ray import serve

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(deployment(args.model, options, ray_opts), name=APP_NAME, route_prefix="/")
        print(f"serving {args.model.resolve().name} on http://{args.host}:{args.port} (Ray Serve; "
              "Ctrl-C stops)", file=sys.stderr, flush=True)  # fmt: skip
        stop.wait()
    finally:
        if local:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
        import ray

        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
