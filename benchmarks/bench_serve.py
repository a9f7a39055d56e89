"""Serving benchmark: in-process scoring vs HTTP scoring of the same slide, and load from concurrent clients.

    .venv/bin/python benchmarks/bench_serve.py            # full run, prints markdown tables
    .venv/bin/python benchmarks/bench_serve.py --quick    # fewer requests, cpu-small only
    .venv/bin/python benchmarks/bench_serve.py --skip-paper --hard-replicas 1   # the overhead target's size

1. Overhead. For each model size (cpu-small on a 4096² slide; paper-her2 on an 8192² slide, both
   randomly initialised: timing does not depend on training), the same slide and seed are scored
   (a) in this process with ``pipeline.score_slide`` (thumbnail, tissue mask, SAM, sampler, tile reads
   through OpenSlide, agent), before and after (b) sequential HTTP requests to the Serve app from a load
   generator in a separate process. Both sides use one torch thread. Two views of the overhead:
   ``HTTP vs in-process = (HTTP p50 - in-process p50) / in-process p50`` (the service also reads tiles in
   parallel actors, so this can be negative), and per request ``serving overhead = latency - in-stage
   work`` (soft-attention compute + tile reads + agent batch, as the stages time themselves): what HTTP,
   the ingress, handle round trips and serialisation add, as a fraction of that work (issue 12's target
   at cpu-small: <= 15%), and where it goes (outside the ingress, and each answer's ``profile.serving_ms``).
   Each serving variant (``VARIANTS``: the former 5 ms agent-batch wait, and the shipped settings) is its
   own Serve app; their requests alternate in rounds, so they share the machine's load.
2. Load. cpu-small, 1 and 2 hard-attention replicas (soft stage and ingress 1 replica each), each variant,
   1, 4 and 16 concurrent clients (an async httpx client in a separate process, loopback only), a bounded
   number of requests per run: throughput and latency percentiles.

Writes ``benchmarks/results/serve.json`` (``--out``).

Slides and checkpoints are written once into ``--work-dir`` (outside git) and reused.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))


# -- load generator (runs as its own process) ------------------------------------------------------------


async def _generate_load(url: str, body: dict, concurrency: int, requests: int) -> dict:
    import httpx

    latencies: list[float] = []
    statuses: list[int] = []
    server_timings: list[dict] = []
    remaining = list(range(requests))

    async def client_loop(client: httpx.AsyncClient) -> None:
        while remaining:
            remaining.pop()
            start = time.perf_counter()
            answer = await client.post("/v1/score", json=body)
            latencies.append(time.perf_counter() - start)
            statuses.append(answer.status_code)
            if answer.status_code == 200:
                answered = answer.json()
                server_timings.append({**answered["timings"], "profile": answered["profile"]})

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*[client_loop(client) for _ in range(concurrency)])
        wall_s = time.perf_counter() - started
    return {"latencies_s": latencies, "statuses": statuses, "wall_s": wall_s, "server_timings": server_timings}


def run_load_generator(url: str, body: dict, concurrency: int, requests: int) -> dict:
    """Start the load generator as a separate Python process; its JSON result."""
    command = [sys.executable, __file__, "--loadgen", url, "--loadgen-body", json.dumps(body),
               "--concurrency", str(concurrency), "--requests", str(requests)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- helpers ---------------------------------------------------------------------------------------------


def percentiles(values: list[float]) -> tuple[float, float, float]:
    p50, p95, p99 = np.percentile(np.asarray(values), [50, 95, 99])
    return float(p50), float(p95), float(p99)


def ms(value: float) -> str:
    return f"{value * 1000:.1f}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prepare(work_dir: Path, preset_name: str, slide_px: int) -> tuple[Path, Path]:
    """A random-initialised checkpoint of the preset and a synthetic HER2 slide, written once."""
    import torch

    from dual_attention.checkpoint import save_checkpoint
    from dual_attention.config import preset
    from dual_attention.models import DualAttentionModel
    from dual_attention.synthetic import write_synthetic_slide

    checkpoint = work_dir / f"checkpoint-{preset_name}"
    if not (checkpoint / "model.pt").is_file():
        config = preset(preset_name)
        torch.manual_seed(0)
        save_checkpoint(checkpoint, DualAttentionModel(config).eval(), config)
    slide = work_dir / "slides" / f"her2-{slide_px}.tiff"
    if not slide.is_file():
        slide.parent.mkdir(parents=True, exist_ok=True)
        partial = slide.with_name(f".partial-{slide.name}")
        print(f"writing {slide} once ...", flush=True)
        write_synthetic_slide(partial, "her2", label=2, seed=7, width_level0_px=slide_px, height_level0_px=slide_px)
        os.replace(partial, slide)
    return checkpoint, slide


def in_process_latencies(checkpoint: Path, slide_path: Path, seed: int, reps: int) -> list[float]:
    """Wall time of the whole scoring of one slide in this process (no Ray), ``reps`` times."""
    from dual_attention.checkpoint import load_checkpoint
    from dual_attention.pipeline import score_slide
    from dual_attention.slides import open_slide, tissue_mask

    model, config, _ = load_checkpoint(checkpoint)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        with open_slide(slide_path) as slide:
            thumbnail = slide.thumbnail(config.slide.thumbnail_downsample)
            mask = tissue_mask(thumbnail, config.slide.tissue_min_area_thumb_px)
            score_slide(model, thumbnail, mask, slide.dimensions,
                        lambda boxes, s=slide: np.stack([s.read_box(b) for b in boxes]), config, seed)
        times.append(time.perf_counter() - start)
    return times


def deploy(checkpoint: Path, slide_root: Path, hard_replicas: int = 1, name: str = "bench", route_prefix: str = "/",
           **extra: object) -> None:
    from ray import serve

    from serve.app import build_app

    app = build_app({"model": str(checkpoint), "slide_root": str(slide_root), "soft_replicas": 1,
                     "hard_replicas": hard_replicas, "ingress_replicas": 1, "torch_threads": 1, "tile_readers": 2,
                     **extra})
    serve.run(app, name=name, route_prefix=route_prefix)


# -- the benchmark ---------------------------------------------------------------------------------------

# Serving variants measured side by side (``--overhead-variants``): "before" is the agent batch's former
# 5 ms wait for company; "after" is the shipped default (serve.stages.HARD_BATCH_WAIT_S).
VARIANTS = {"before": {"hard_batch_wait_s": 0.005}, "after": {}}
SERVING_PARTS = ("outside_ingress", "validate", "soft_call", "hard_call", "agent_queue", "ingress")


def serving_parts(latency_s: float, timings: dict, profile: dict) -> dict[str, float]:
    """Milliseconds serving added to one request, by where: outside the ingress (HTTP, proxy, the ingress
    replica's round trip, the answer's JSON) and the answer's own ``profile.serving_ms``."""
    return {"outside_ingress": (latency_s - timings["total_s"]) * 1e3, **profile["serving_ms"]}


def deploy_empty_ingress(route_prefix: str) -> None:
    """A FastAPI ingress that does no work: Serve's own HTTP round trip (the proxy, one replica, the JSON
    answer), the floor under any Serve app's overhead on this machine at this moment."""
    from fastapi import FastAPI
    from ray import serve

    app = FastAPI()

    @serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0.25})
    @serve.ingress(app)
    class EmptyIngress:
        @app.post("/v1/score")
        async def score(self, body: dict) -> dict:
            return {"timings": {}, "profile": {}}

    serve.run(EmptyIngress.bind(), name="bench-empty", route_prefix=route_prefix)


def overhead_rows(url: str, work_dir: Path, models: list[tuple[str, int, int]], rounds: int = 5
                  ) -> tuple[list[str], list[str], list[dict]]:
    """Per model: in-process scoring before and after sequential HTTP requests to each serving variant,
    the variants' requests interleaved in ``rounds`` rounds so that they share the machine's load."""
    from ray import serve

    rows, part_rows, records = [], [], []
    for preset_name, slide_px, reps in models:
        checkpoint, slide = prepare(work_dir, preset_name, slide_px)
        for variant, extra in VARIANTS.items():
            deploy(checkpoint, slide.parent, name=f"bench-{variant}", route_prefix=f"/{variant}", **extra)
        deploy_empty_ingress("/empty")
        body = {"slide": slide.name, "seed": 0}
        run_load_generator(f"{url}/empty", body, 1, 2)
        for variant in VARIANTS:
            run_load_generator(f"{url}/{variant}", body, 1, 2)  # warm-up: first requests start the tile readers
        in_process_latencies(checkpoint, slide, 0, 1)  # warm-up
        before = in_process_latencies(checkpoint, slide, 0, reps)
        http = {variant: {"latencies_s": [], "server_timings": [], "statuses": []} for variant in VARIANTS}
        empty: list[float] = []
        per_round = max(1, reps // rounds)
        for _ in range(rounds):
            empty += run_load_generator(f"{url}/empty", body, 1, per_round)["latencies_s"]
            for variant in VARIANTS:
                answer = run_load_generator(f"{url}/{variant}", body, 1, per_round)
                for key in http[variant]:
                    http[variant][key] += answer[key]
        after = in_process_latencies(checkpoint, slide, 0, reps)
        local = before + after
        local_p = percentiles(local)
        drift = abs(statistics.median(after) - statistics.median(before)) / statistics.median(local)
        for variant, result in http.items():
            assert set(result["statuses"]) == {200}, result["statuses"]
            http_p = percentiles(result["latencies_s"])
            versus_local = (http_p[0] - local_p[0]) / local_p[0]
            timings = result["server_timings"]
            # Per request: the work done in the stages (soft-attention compute, tile reads, agent batch) and
            # everything else (HTTP proxy, ingress, handle round trips, serialisation, queues).
            work = [t["soft_attention_compute_s"] + t["tile_read_s"] + t["hard_attention_compute_s"] for t in timings]
            serving = [latency - w for latency, w in zip(result["latencies_s"], work, strict=True)]
            serving_ratio = statistics.median(o / w for o, w in zip(serving, work, strict=True))
            stages = {key: statistics.median(t[key] for t in timings)
                      for key in ("soft_attention_compute_s", "tile_read_s", "hard_attention_compute_s")}
            parts = [serving_parts(latency, t, t["profile"])
                     for latency, t in zip(result["latencies_s"], timings, strict=True)]
            part_p50 = {key: statistics.median(p[key] for p in parts) for key in SERVING_PARTS}
            rows.append(
                f"| {preset_name} | {variant} | {slide_px}² | {reps} + {reps} / {len(result['latencies_s'])} | "
                f"{ms(local_p[0])} / {ms(local_p[1])} / {ms(local_p[2])} | {ms(http_p[0])} / {ms(http_p[1])} / "
                f"{ms(http_p[2])} | {versus_local:+.1%} | {drift:.1%} | {ms(stages['soft_attention_compute_s'])} / "
                f"{ms(stages['tile_read_s'])} / {ms(stages['hard_attention_compute_s'])} | "
                f"{ms(statistics.median(serving))} ({serving_ratio:.1%}) |")
            part_rows.append(f"| {preset_name} | {variant} | " + " | ".join(f"{part_p50[k]:.1f}" for k in SERVING_PARTS)
                             + " |")
            records.append({"model": preset_name, "variant": variant, "settings": VARIANTS[variant],
                            "slide_px": slide_px, "in_process_s": local, "http": result,
                            "serving_overhead_p50_s": statistics.median(serving),
                            "serving_overhead_ratio_p50": serving_ratio, "serving_parts_p50_ms": part_p50})
            print(rows[-1], part_rows[-1], sep="\n", flush=True)
        empty_p50_ms = statistics.median(empty) * 1e3
        part_rows.append(f"| {preset_name} | empty FastAPI ingress (Serve's floor): HTTP p50 {empty_p50_ms:.1f} ms |"
                         + " |" * (len(SERVING_PARTS) - 1))
        records.append({"model": preset_name, "variant": "empty ingress", "latencies_s": empty,
                        "latency_p50_ms": empty_p50_ms})
        print(part_rows[-1], flush=True)
        for name in [*VARIANTS, "empty"]:
            serve.delete(f"bench-{name}")
    return rows, part_rows, records


def load_rows(url: str, work_dir: Path, replicas: list[int], concurrencies: list[int], requests: int) -> list[str]:
    """Throughput and latency under concurrent clients, for each hard-attention replica count and serving
    variant (the variants' runs interleaved per concurrency)."""
    rows = []
    checkpoint, slide = prepare(work_dir, "cpu-small", 4096)
    body = {"slide": slide.name, "seed": 0}
    for hard_replicas in replicas:
        for variant, extra in VARIANTS.items():
            deploy(checkpoint, slide.parent, hard_replicas, name=f"load-{variant}", route_prefix=f"/{variant}",
                   **extra)
            run_load_generator(f"{url}/{variant}", body, 2, 4)  # warm-up
        for concurrency in concurrencies:
            for variant in VARIANTS:
                result = run_load_generator(f"{url}/{variant}", body, concurrency, max(requests, 2 * concurrency))
                assert set(result["statuses"]) == {200}, result["statuses"]
                p50, p95, p99 = percentiles(result["latencies_s"])
                throughput = len(result["latencies_s"]) / result["wall_s"]
                rows.append(f"| {hard_replicas} | {variant} | {concurrency} | {len(result['latencies_s'])} | "
                            f"{throughput:.2f} | {ms(p50)} | {ms(p95)} | {ms(p99)} |")
                print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/dual-attention-bench-serve"))
    parser.add_argument("--reps", type=int, default=20, help="sequential requests per side, cpu-small")
    parser.add_argument("--paper-reps", type=int, default=6, help="sequential requests per side, paper-her2")
    parser.add_argument("--requests", type=int, default=48, help="requests per load run")
    parser.add_argument("--quick", action="store_true", help="cpu-small only, fewer requests")
    parser.add_argument("--skip-load", action="store_true")
    parser.add_argument("--skip-paper", action="store_true", help="cpu-small only (the overhead target's size)")
    parser.add_argument("--hard-replicas", type=int, nargs="+", default=[1, 2], help="load runs: replica counts")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "benchmarks" / "results" / "serve.json")
    # load-generator mode (internal)
    parser.add_argument("--loadgen", help=argparse.SUPPRESS)
    parser.add_argument("--loadgen-body", help=argparse.SUPPRESS)
    parser.add_argument("--concurrency", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.loadgen:
        print(json.dumps(asyncio.run(_generate_load(args.loadgen, json.loads(args.loadgen_body), args.concurrency,
                                                    args.requests))))
        return 0

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    from serve.settings import patient_serve_proxy

    patient_serve_proxy()  # Serve's proxy as `dual-attention serve` starts it (its retry middleware included)
    import ray
    import torch
    from ray import serve

    torch.set_num_threads(1)  # the same as each model replica (torch_threads=1)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    models = [("cpu-small", 4096, args.reps)]
    if args.quick:
        models = [("cpu-small", 4096, max(5, args.reps // 4))]
        args.requests = 16
    elif not args.skip_paper:
        models.append(("paper-her2", 8192, args.paper_reps))

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    started = datetime.now(UTC).isoformat(timespec="seconds")
    load_start = os.getloadavg()
    load: list[str] = []
    load_end = load_start
    ray.init(address="local", num_cpus=8, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start", flush=True)
        header = ("| model | serving | slide | requests (in-process before+after / HTTP) | in-process p50 / p95 / "
                  "p99 ms | HTTP p50 / p95 / p99 ms | HTTP vs in-process (p50) | in-process drift | in-stage work p50 "
                  "ms: soft / tile reads / agent | serving overhead p50 ms (of in-stage work) |"
                  "\n|---|---|---|---|---|---|---|---|---|---|")
        parts_header = ("| model | serving | " + " | ".join(f"{k} p50 ms" for k in SERVING_PARTS) + " |\n|---|---|"
                        + "---|" * len(SERVING_PARTS))
        print(header, flush=True)
        overhead, parts, records = overhead_rows(url, args.work_dir, models)
        if not args.skip_load:
            load_header = ("| hard-attention replicas | serving | concurrent clients | requests | throughput req/s | "
                           "p50 ms | p95 ms | p99 ms |\n|---|---|---|---|---|---|---|---|")
            print(load_header, flush=True)
            load = load_rows(url, args.work_dir, args.hard_replicas, [1, 4, 16], args.requests)
        load_end = os.getloadavg()
        print(f"\nload average {load_end[0]:.1f} at end\n")
        print(header)
        print("\n".join(overhead))
        print()
        print(parts_header)
        print("\n".join(parts))
        if load:
            print()
            print(load_header)
            print("\n".join(load))
    finally:
        serve.shutdown()
        ray.shutdown()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": started, "command": " ".join([Path(sys.executable).name, *sys.argv]),
                                    "machine": {"cores": os.cpu_count(), "load_average_start": load_start,
                                                "load_average_end": load_end},
                                    "overhead": records, "overhead_table": [header, *overhead],
                                    "serving_parts_table": [parts_header, *parts], "load_table": load}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
