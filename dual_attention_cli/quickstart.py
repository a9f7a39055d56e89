"""``dual-attention quickstart``: the whole product end to end on the embedded default.

Local Ray, a local MLflow store (SQLite) in the work folder, a small synthetic HER2 cohort:

    synth -> preprocess -> train (Ray Train, 2 workers, joint loss) -> evaluate on the held-out fold
    -> register the model -> Ray Serve on 127.0.0.1 -> score a slide over HTTP -> summary

Running it again reuses the cohort (same parameters) and the MLflow store (a new model version), and
picks a free port. Ctrl-C shuts Serve and the local Ray instance down.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LOCAL_HOST = "127.0.0.1"


@dataclass
class QuickstartOptions:
    workdir: Path = Path("runs/quickstart")
    n_slides: int = 48  # 36 train (3 folds), 12 held out
    slide_level0_px: int = 3072
    epochs: int = 10  # the cpu-small preset's 10 x 100 steps: the agent needs ~1000 updates to read tiles
    steps_per_epoch: int = 100  # per worker; 0: one pass over the training slides
    num_workers: int = 2
    port: int = 8000
    seed: int = 0
    fresh: bool = False  # regenerate the cohort even when one with the same parameters exists


@dataclass
class StepTime:
    name: str
    seconds: float
    detail: str


@dataclass
class QuickstartResult:
    manifest: Path
    tracking_uri: str
    model_uri: str
    evaluation: dict[str, Any]
    http_score: dict[str, Any]
    overlay_png: Path
    steps: list[StepTime] = field(default_factory=list)


def free_port(preferred: int) -> int:
    """``preferred`` if nothing listens there on 127.0.0.1, else (or for 0) a free port the OS picks."""
    if preferred:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            if probe.connect_ex((LOCAL_HOST, preferred)) != 0:
                return preferred
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCAL_HOST, 0))
        return int(sock.getsockname()[1])


@contextmanager
def _step(steps: list[StepTime], name: str, announce: str):
    print(f"\n== {name}: {announce}", flush=True)
    started = time.perf_counter()
    detail: dict[str, str] = {"text": ""}
    yield detail
    steps.append(StepTime(name, time.perf_counter() - started, detail["text"]))
    print(f"== {name}: done in {steps[-1].seconds:.1f} s {detail['text']}", flush=True)


def ensure_cohort(options: QuickstartOptions) -> Path:
    """Reuse the cohort when it was made with the same parameters, else (re)generate it."""
    from dual_attention.synthetic import write_cohort

    cohort_dir = options.workdir / "cohort"
    stamp_path = cohort_dir / "quickstart-params.json"
    params = {"task": "her2", "n_slides": options.n_slides, "slide_level0_px": options.slide_level0_px,
              "seed": options.seed}
    manifest = cohort_dir / "manifest.parquet"
    reusable = not options.fresh and manifest.is_file() and stamp_path.is_file()
    if reusable and json.loads(stamp_path.read_text()) == params:
        print(f"reusing the cohort in {cohort_dir} (same parameters; --fresh regenerates it)")
        return manifest
    if cohort_dir.exists():
        shutil.rmtree(cohort_dir)
    manifest = write_cohort(cohort_dir, "her2", options.n_slides, options.seed,
                            slide_level0_px=options.slide_level0_px, n_folds=4)
    stamp_path.write_text(json.dumps(params))
    return manifest


def run_quickstart(options: QuickstartOptions) -> QuickstartResult:
    from serve.settings import patient_serve_proxy

    patient_serve_proxy()
    import httpx
    import ray
    from ray import serve

    from dual_attention.config import preset
    from jobs.evaluate import evaluate_manifest
    from jobs.runtime import tracking
    from jobs.runtime.cluster import start_ray
    from jobs.train import TrainRun, run_training
    from serve.app import build_app

    workdir = options.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    options.workdir = workdir
    tracking_uri = tracking.sqlite_uri(workdir / "mlflow.db")
    config = preset("cpu-small").with_overrides({
        "train.epochs": options.epochs,
        "train.steps_per_epoch": options.steps_per_epoch,
        "train.num_workers": options.num_workers,
        "train.seed": options.seed,
        "train.val_fold": 0,
    })
    steps: list[StepTime] = []

    with _step(steps, "synth", f"{options.n_slides} synthetic HER2 slides of "
                                f"{options.slide_level0_px}² level-0 px") as detail:
        manifest = ensure_cohort(options)
        detail["text"] = f"-> {manifest}"

    # Every Ray worker (train workers, Serve replicas) inherits this: one MLflow store for the whole run.
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    # Worker output reaches this terminal (rank 0 prints one line per epoch: the training progress);
    # Ray's own INFO chatter does not. The dashboard is for you to watch, and Ray Train's placement-group
    # cleaner needs it (without it, it warns every second). A private instance whatever $RAY_ADDRESS says:
    # everything the quickstart makes lives in its local work folder. Token authentication stays on, as
    # Ray ships it (the dashboard asks for the token: `ray get-auth-token`).
    dashboard_port = free_port(8265)
    start_ray(address="local", num_cpus=8, include_dashboard=True, dashboard_host=LOCAL_HOST,
              dashboard_port=dashboard_port, logging_config=ray.LoggingConfig(log_level="WARNING"))
    token_hint = "" if os.environ.get("RAY_AUTH_MODE") == "disabled" else " (its token: `ray get-auth-token`)"
    print(f"Ray dashboard: http://{LOCAL_HOST}:{dashboard_port}{token_hint}", flush=True)
    try:
        with _step(steps, "train", f"Ray Train, {options.num_workers} workers, joint loss, "
                                   f"{options.epochs} epochs (preprocessing first)") as detail:
            run_dir = workdir / "runs" / time.strftime("%Y%m%d-%H%M%S")
            report = run_training(config, manifest, TrainRun(run_dir, val_folds=(0,), mlflow_uri=tracking_uri,
                                                              cache_dir=workdir / "cache", model_alias="candidate"))
            model_name = report["model_name"]
            model_uri = f"models:/{model_name}@candidate"
            detail["text"] = f"-> registered {model_uri}"

        with _step(steps, "evaluate", "held-out fold 0 (not trained on)") as detail:
            evaluation = evaluate_manifest(model_uri, manifest, workdir / "evaluation", folds=[0],
                                           tracking_uri=tracking_uri, n_overlays=2).summary()
            detail["text"] = f"-> {workdir / 'evaluation'}"

        port = free_port(options.port)
        with _step(steps, "serve", f"Ray Serve on http://{LOCAL_HOST}:{port}") as detail:
            serve.start(http_options={"host": LOCAL_HOST, "port": port})
            app = build_app({"model": model_uri, "slide_root": str(manifest.parent), "tracking_uri": tracking_uri})
            serve.run(app, name="dual-attention", route_prefix="/",
                      logging_config={"log_level": "WARNING", "enable_access_log": False})
            health = httpx.get(f"http://{LOCAL_HOST}:{port}/v1/healthz", timeout=60)
            if health.status_code != 200:
                raise RuntimeError(f"the scoring service is not healthy ({health.status_code}): {health.text}")
            detail["text"] = "-> healthy"

        with _step(steps, "score", "one held-out slide over HTTP") as detail:
            slide = _first_slide_of_fold(manifest, fold=0)
            answer = httpx.post(f"http://{LOCAL_HOST}:{port}/v1/score", params={"overlay": "true"},
                                json={"slide": slide, "seed": options.seed}, timeout=300)
            if answer.status_code != 200:
                raise RuntimeError(f"POST /v1/score answered {answer.status_code}: {answer.text}")
            http_score = answer.json()
            overlay_png = workdir / "overlay.png"
            png = httpx.get(f"http://{LOCAL_HOST}:{port}{http_score['overlay_url']}", timeout=60)
            png.raise_for_status()
            overlay_png.write_bytes(png.content)
            detail["text"] = f"-> {slide}: {http_score['predicted_label']}"
    finally:
        serve.shutdown()
        ray.shutdown()
    return QuickstartResult(manifest, tracking_uri, model_uri, evaluation, http_score, overlay_png, steps)


def _first_slide_of_fold(manifest: Path, fold: int) -> str:
    """A slide of the held-out fold, as a path relative to the cohort folder (the server's slide root)."""
    from dual_attention.manifest import read_manifest

    table = read_manifest(manifest).to_pylist()
    row = next(r for r in table if int(r["fold"]) == fold)
    return str(Path(row["path"]).resolve().relative_to(manifest.parent.resolve()))


def print_summary(result: QuickstartResult) -> None:
    print("\n" + "=" * 78)
    print(f"{'step':10s} {'seconds':>8s}  detail")
    for step in result.steps:
        print(f"{step.name:10s} {step.seconds:8.1f}  {step.detail}")
    print(f"{'total':10s} {sum(s.seconds for s in result.steps):8.1f}")
    print("-" * 78)
    shown = ("n_slides", "accuracy", "f1_macro", "auroc", "agreement_points_per_case", "weighted_confidence",
             "combined_points", "fraction_level0_read", "wall_time_per_slide_s")
    print("held-out evaluation: " + ", ".join(
        f"{k}={_fmt(result.evaluation[k])}" for k in shown if k in result.evaluation))
    score = result.http_score
    probabilities = ", ".join(f"{p:.3f}" for p in score["class_probabilities"])
    print(f"HTTP score of {score['slide']}: {score['predicted_label']} (confidence {score['confidence']:.3f}; "
          f"class probabilities {probabilities}); {len(score['tiles'])} tiles, "
          f"{100 * score['fraction_level0_read']:.2f}% of level-0 pixels read, "
          f"{score['timings']['total_s']:.2f} s")
    print(f"model: {result.model_uri} (version {score['model']['version']})")
    print(f"overlay: {result.overlay_png}")
    print(f"MLflow UI: mlflow ui --backend-store-uri {result.tracking_uri} --host 127.0.0.1")


def write_summary(result: QuickstartResult, path: Path) -> None:
    """The run's outcome as JSON, for scripts (and the test) to read."""
    summary = {
        "manifest": str(result.manifest), "tracking_uri": result.tracking_uri, "model_uri": result.model_uri,
        "evaluation": result.evaluation, "http_score": result.http_score, "overlay_png": str(result.overlay_png),
        "steps": [{"name": s.name, "seconds": round(s.seconds, 2), "detail": s.detail} for s in result.steps],
    }
    path.write_text(json.dumps(summary, indent=2, default=str))


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    defaults = QuickstartOptions()
    parser = argparse.ArgumentParser(prog=prog or "dual-attention quickstart", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=defaults.workdir,
                        help=f"cohort, MLflow store, runs and outputs (default {defaults.workdir})")
    parser.add_argument("--n-slides", type=int, default=defaults.n_slides, help="slides in the synthetic cohort")
    parser.add_argument("--slide-px", type=int, default=defaults.slide_level0_px, help="level-0 side of each slide")
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--steps-per-epoch", type=int, default=defaults.steps_per_epoch,
                        help="0: one pass over the training slides")
    parser.add_argument("--num-workers", type=int, default=defaults.num_workers, help="Ray Train workers")
    parser.add_argument("--port", type=int, default=defaults.port, help="HTTP port (a free one if taken)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--fresh", action="store_true", help="regenerate the cohort")
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    options = QuickstartOptions(workdir=args.workdir, n_slides=args.n_slides, slide_level0_px=args.slide_px,
                                epochs=args.epochs, steps_per_epoch=args.steps_per_epoch,
                                num_workers=args.num_workers, port=args.port, seed=args.seed, fresh=args.fresh)
    started = time.perf_counter()
    try:
        result = run_quickstart(options)
    except KeyboardInterrupt:
        print("\ninterrupted: Serve and the local Ray instance were shut down", file=sys.stderr)
        return 130
    print_summary(result)
    write_summary(result, options.workdir / "quickstart-summary.json")
    print(f"quickstart finished in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
