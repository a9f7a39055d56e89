"""``dual-attention serve``: start the scoring service locally on 127.0.0.1 (also ``python -m serve``).

Joins the Ray cluster that ``--address`` or ``$RAY_ADDRESS`` names, else starts a private local instance
(the one rule of ``jobs.runtime.cluster``); starts Serve's HTTP proxy on 127.0.0.1:PORT and the application of
``serve.app.build_app``; blocks until Ctrl-C, then shuts Serve down. The bearer token is
read from ``DUAL_ATTENTION_API_TOKEN`` only (a command-line token would show in ``ps``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

LOCAL_HOST = "127.0.0.1"


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.environ.get("DUAL_ATTENTION_MODEL"),
                        help="models:/NAME@ALIAS, models:/NAME/VERSION or a checkpoint path "
                             "(default: $DUAL_ATTENTION_MODEL)")
    parser.add_argument("--slide-root", default=os.environ.get("DUAL_ATTENTION_SLIDE_ROOT", "."),
                        help="folder that request slide paths are relative to (default: $DUAL_ATTENTION_SLIDE_ROOT or .)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port on 127.0.0.1 (default 8000)")
    parser.add_argument("--max-upload-mb", type=float, default=None, help="largest accepted upload (default 512)")
    parser.add_argument("--upload-dir", default=None, help="where uploads are streamed (default: system temp)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)")
    parser.add_argument("--tile-readers", type=int, default=None, help="tile-reader actors (default 2)")
    parser.add_argument("--work-dir", default=None, help="overlay PNGs go to its overlays/ (default: system temp)")
    parser.add_argument("--max-level0-pixels", type=float, default=None,
                        help="refuse slides declaring more level-0 pixels (413; default 2e10)")
    parser.add_argument("--max-thumbnail-decode-mb", type=float, default=None,
                        help="refuse slides whose thumbnail would decode more (413; default 2048)")
    parser.add_argument("--request-deadline-s", type=float, default=None,
                        help="a scoring request's deadline (504 after it; default 120)")
    parser.add_argument("--torch-threads", type=int, default=1, help="torch threads per model replica (default 1)")
    parser.add_argument("--num-cpus", type=float, default=8,
                        help="logical CPUs of the local Ray instance (replicas take fractions; default 8)")
    parser.add_argument("--address", default=None,
                        help="join this Ray cluster (HOST:6379) instead of starting one (default: $RAY_ADDRESS)")
    parser.add_argument("--check", action="store_true",
                        help="start, wait until /v1/healthz answers, print it, and stop (a smoke test)")
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    if not args.model:
        print("error: no model: pass --model or set DUAL_ATTENTION_MODEL", file=sys.stderr)
        return 2
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    from serve.settings import patient_serve_proxy

    patient_serve_proxy()
    import ray
    from ray import serve

    from serve.app import build_app
    from serve.settings import ServeSettings, SettingsError

    app_args = {"model": args.model, "slide_root": args.slide_root, "max_upload_mb": args.max_upload_mb,
                "upload_dir": args.upload_dir, "tracking_uri": args.tracking_uri,
                "tile_readers": args.tile_readers, "torch_threads": args.torch_threads, "work_dir": args.work_dir,
                "max_level0_pixels": args.max_level0_pixels, "max_thumbnail_decode_mb": args.max_thumbnail_decode_mb,
                "request_deadline_s": args.request_deadline_s}
    try:
        application = build_app({k: v for k, v in app_args.items() if v is not None})
    except SettingsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from jobs.runtime.cluster import RayAddressError, start_ray

    try:
        start_ray(address=args.address, num_cpus=args.num_cpus)
    except RayAddressError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        # The proxy's own timeout (408) is a safety net behind the app's JSON 504 deadline, hence longer.
        proxy_timeout_s = (args.request_deadline_s or ServeSettings.request_deadline_s) + 60
        serve.start(http_options={"host": LOCAL_HOST, "port": args.port, "request_timeout_s": proxy_timeout_s})
        serve.run(application, name="dual-attention", route_prefix="/")
        url = f"http://{LOCAL_HOST}:{args.port}"
        print(f"dual attention scoring service at {url} (OpenAPI: {url}/docs); Ctrl-C to stop", flush=True)
        if args.check:
            return _check(url)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        serve.shutdown()
        ray.shutdown()


def _check(url: str) -> int:
    import httpx

    answer = httpx.get(f"{url}/v1/healthz", timeout=30)
    print(answer.status_code, answer.text)
    return 0 if answer.status_code == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
