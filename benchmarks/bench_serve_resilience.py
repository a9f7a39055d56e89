"""Serving resilience benchmark (issue 14): hostile slide declarations and replica kills under load.

    .venv/bin/python benchmarks/bench_serve_resilience.py            # full run: markdown tables + JSON
    .venv/bin/python benchmarks/bench_serve_resilience.py --quick    # fewer requests, shorter kill windows

The app is deployed as serve/config.yaml ships it: its ``args`` (limits, deadline, tile readers, torch
threads) with only the model, slide root and work folder replaced, and each deployment at the replica
count config.yaml gives it (ingress ``num_replicas``; the autoscaled stages at their ``min_replicas``,
fixed, so that a kill always meets the smallest fleet config.yaml allows). Model: cpu-small, randomly
initialised (timing does not depend on training); good slide: synthetic HER2 4096². All traffic goes to
127.0.0.1 from a load generator in a separate process; every client loop is bounded in count and time.

1. Hostile declarations. Two valid tiled TIFFs, tiny on disk: 16384² of blank (white) tiles, and a sparse
   one declaring 10^6 x 10^6 px. Three phases in one run, each with 4 good clients scoring the good slide:
   quiet (no hostile traffic), hostile (4 more clients, one per hostile slide x by name / by upload, each
   sending requests back to back while the good clients run; the good clients go on until each hostile
   client has had a few answers), quiet again (drift). Good p50/p99 per phase, hostile
   answers' statuses and latencies, and the service's RSS (sum over Ray worker processes, psutil) before,
   peak during (sampled every 0.25 s) and after. Targets: good p99 <= 2x quiet; hostile 413/422 within the
   deadline; RSS bounded.
2. Replica kills. For each of the ingress, soft-attention, hard-attention and one tile-reader actor: 4
   clients send requests continuously; one replica's process is SIGKILLed (found by its Ray process title
   ``ray::ServeReplica:<app>:<deployment>`` / ``ray::TileReader``, cross-checked with Serve's replica
   count), and per kill: failed requests (non-200), their statuses, whether each was JSON with Retry-After,
   time from the kill until requests succeed again, and until Serve reports the deployment healthy with a
   replacement running. Targets: <= 1 failed request per kill, every failure 503 JSON, recovery <= 5 s.

Writes ``benchmarks/results/serve_resilience.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))
sys.path.insert(0, str(PROJECT_ROOT / "benchmarks"))

APP = "resilience"
RESULTS = PROJECT_ROOT / "benchmarks" / "results" / "serve_resilience.json"
HOSTILE = {"blank-16k.tiff": (16384, 1024, True), "giant-1e6.tiff": (10**6, 16384, False)}


# -- load generator (runs as its own process) ------------------------------------------------------------


async def _generate(spec: dict) -> dict:
    """Clients as ``spec["clients"]`` lists them; each request is recorded with wall-clock times (shared
    with the parent process, which kills replicas at a wall-clock time)."""
    import httpx

    stop_at = time.time() + spec["max_s"]
    records: list[dict] = []
    good_running = [sum(1 for c in spec["clients"] if c["kind"] == "good")]
    hostile_running = [sum(1 for c in spec["clients"] if c["kind"] == "hostile")]

    async def one(client: httpx.AsyncClient, request: dict) -> dict:
        t0 = time.time()
        try:
            if "upload" in request:
                content = Path(request["upload"]).read_bytes()
                answer = await client.post("/v1/score/upload",
                                           files={"file": (Path(request["upload"]).name, content)})
            else:
                answer = await client.post("/v1/score", json=request["json"])
            record = {"status": answer.status_code, "json": "application/json" in answer.headers.get(
                "content-type", ""), "retry_after": answer.headers.get("retry-after")}
            if answer.status_code != 200:
                record["detail"] = answer.text[:200]
        except httpx.HTTPError as error:  # no HTTP answer at all (connection reset, timeout)
            record = {"status": 0, "json": False, "retry_after": None, "detail": f"{type(error).__name__}: {error}"}
        record.update(t0=t0, t1=time.time())
        return record

    async def client_loop(index: int, client_spec: dict, client: httpx.AsyncClient) -> None:
        requests = client_spec["requests"]
        sent = 0
        # Good clients send at least ``min_requests``, and go on until every hostile client has sent its
        # ``min_requests``; hostile clients go on until the good ones stop. Every loop ends at
        # ``max_requests`` or ``max_s``.
        for n in range(client_spec["max_requests"]):
            if time.time() >= stop_at or (client_spec["kind"] == "hostile" and good_running[0] == 0):
                break
            if client_spec["kind"] == "good" and n >= client_spec.get("min_requests", 0) and not hostile_running[0]:
                break
            request = requests[n % len(requests)]
            record = await one(client, request)
            record.update(client=index, kind=client_spec["kind"], name=request.get("name", ""))
            records.append(record)
            sent = n + 1
            if client_spec["kind"] == "hostile" and sent == client_spec["min_requests"]:
                hostile_running[0] -= 1  # sent its share; goes on while the good clients run
        if client_spec["kind"] == "good":
            good_running[0] -= 1
        elif sent < client_spec["min_requests"]:  # stopped early (max_s)
            hostile_running[0] -= 1

    limits = httpx.Limits(max_connections=len(spec["clients"]), max_keepalive_connections=len(spec["clients"]))
    async with httpx.AsyncClient(base_url=spec["url"], timeout=spec["timeout_s"], limits=limits) as client:
        await asyncio.gather(*[client_loop(i, c, client) for i, c in enumerate(spec["clients"])])
    return {"records": records}


def start_load(spec: dict) -> subprocess.Popen:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(spec, handle)
    return subprocess.Popen([sys.executable, __file__, "--loadgen", handle.name], stdout=subprocess.PIPE, text=True)


def finish_load(process: subprocess.Popen, timeout_s: float) -> list[dict]:
    out, _ = process.communicate(timeout=timeout_s)
    if process.returncode != 0:
        raise RuntimeError(f"load generator failed ({process.returncode})")
    return json.loads(out.strip().splitlines()[-1])["records"]


def good_clients(n_clients: int, max_requests: int, seed0: int = 0) -> list[dict]:
    return [{"kind": "good", "max_requests": max_requests, "min_requests": max_requests,
             "requests": [{"json": {"slide": "her2-4096.tiff", "seed": seed0 + i}, "name": "her2-4096.tiff"}]}
            for i in range(n_clients)]


# -- helpers ---------------------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values), q)) if values else None


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


def write_declared_slide(path: Path, side_px: int, tile_px: int, blank_tiles: bool) -> None:
    """As tests/test_serve.py: a valid tiled TIFF declaring ``side_px``², every tile the same compressed
    white tile, or absent (sparse)."""
    import tifffile

    count = (-(-side_px // tile_px)) ** 2
    tile = zlib.compress(np.full((tile_px, tile_px, 3), 255, np.uint8).tobytes()) if blank_tiles else b""
    tifffile.imwrite(path, (tile for _ in range(count)), shape=(side_px, side_px, 3), dtype=np.uint8,
                     tile=(tile_px, tile_px), photometric="rgb", compression="zlib", bigtiff=side_px > 2**15)


def ray_processes() -> list:
    """This benchmark's Ray worker processes: ``ray::`` titled descendants of its own raylet (other Ray
    clusters on the machine are left out, and never killed)."""
    from ray._private import ray_constants, worker  # importing ray puts the psutil it bundles on sys.path

    # isort: split
    import psutil

    raylet = worker._global_node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
    found = []
    for process in psutil.Process(raylet).children(recursive=True):
        try:
            cmdline = process.cmdline()
            if cmdline and cmdline[0].startswith("ray::"):
                process.info = {"pid": process.pid, "cmdline": cmdline, "memory_info": process.memory_info()}
                found.append(process)
        except psutil.Error:  # exited meanwhile
            continue
    return found


def service_rss_bytes() -> int:
    """RSS summed over Ray worker processes (replicas, tile readers, proxy, controller, idle workers)."""
    return sum(p.info["memory_info"].rss for p in ray_processes() if p.info["memory_info"])


def pids_titled(prefix: str) -> list[int]:
    return sorted(p.info["pid"] for p in ray_processes() if p.info["cmdline"][0].startswith(prefix))


class RssSampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, service_rss_bytes())
            self.stop.wait(0.25)


def deployment_state(name: str) -> tuple[str, int]:
    from ray import serve

    deployment = serve.status().applications[APP].deployments[name]
    return str(deployment.status.value if hasattr(deployment.status, "value") else deployment.status), \
        int(deployment.replica_states.get("RUNNING", 0))


# -- deploy ----------------------------------------------------------------------------------------------


def deploy(checkpoint: Path, slide_root: Path, work_dir: Path) -> dict:
    """serve/config.yaml's args and replica counts, with this run's model, slide root and work folder."""
    import yaml
    from ray import serve

    from serve.app import build_app

    config = yaml.safe_load((PROJECT_ROOT / "serve" / "config.yaml").read_text())["applications"][0]
    deployments = {d["name"]: d for d in config["deployments"]}

    def replicas(name: str) -> int:
        d = deployments[name]
        return int(d.get("num_replicas") or d["autoscaling_config"]["min_replicas"])

    counts = {"ScoringIngress": replicas("ScoringIngress"), "SoftAttentionStage": replicas("SoftAttentionStage"),
              "HardAttentionStage": replicas("HardAttentionStage")}
    args = {**config["args"], "model": str(checkpoint), "slide_root": str(slide_root),
            "work_dir": str(work_dir / "serve-work"), "ingress_replicas": counts["ScoringIngress"],
            "soft_replicas": counts["SoftAttentionStage"], "hard_replicas": counts["HardAttentionStage"]}
    serve.run(build_app(args), name=APP, route_prefix="/")
    return {"args": {k: v for k, v in args.items() if k not in ("model", "slide_root", "work_dir")},
            "replicas": counts}


# -- 1. hostile declarations -----------------------------------------------------------------------------


def summarize_good(records: list[dict]) -> dict:
    good = [r for r in records if r["kind"] == "good"]
    ok = [r["t1"] - r["t0"] for r in good if r["status"] == 200]
    wall = (max(r["t1"] for r in good) - min(r["t0"] for r in good)) if good else 0.0
    return {"requests": len(good), "ok": len(ok), "failed_statuses": sorted(r["status"] for r in good
                                                                            if r["status"] != 200),
            "p50_s": pct(ok, 50), "p99_s": pct(ok, 99), "max_s": max(ok) if ok else None,
            "throughput_rps": len(ok) / wall if wall else None}


def hostile_part(url: str, slide_root: Path, per_client: int, per_hostile: int, deadline_s: float,
                 max_s: float) -> dict:
    hostile_requests = []
    for name in HOSTILE:
        hostile_requests.append({"json": {"slide": name}, "name": f"{name} (by name)"})
        hostile_requests.append({"upload": str(slide_root / name), "name": f"{name} (upload)"})
    common = {"url": url, "timeout_s": deadline_s + 30, "max_s": max_s}
    phases: dict[str, dict] = {}
    rss: dict[str, int] = {"before": service_rss_bytes()}
    hostile_records: list[dict] = []
    for phase in ("quiet", "hostile", "quiet after"):
        clients = good_clients(4, per_client, seed0=100)
        if phase == "hostile":
            for client in clients:  # at least per_client each, then on while the hostile clients send
                client["max_requests"] = 100 * per_client
            clients += [{"kind": "hostile", "min_requests": per_hostile, "max_requests": 50 * per_hostile,
                         "requests": [request]} for request in hostile_requests]
        sampler = RssSampler()
        sampler.start()
        records = finish_load(start_load({**common, "clients": clients}), max_s + deadline_s + 60)
        sampler.stop.set()
        sampler.join()
        rss[f"peak during {phase}"] = sampler.peak
        rss[f"after {phase}"] = service_rss_bytes()
        phases[phase] = summarize_good(records)
        if phase == "hostile":
            hostile_records = [r for r in records if r["kind"] == "hostile"]
        print(f"  {phase}: {phases[phase]}", flush=True)
    hostile = {}
    for name in sorted({r["name"] for r in hostile_records}):
        rs = [r for r in hostile_records if r["name"] == name]
        latencies = [r["t1"] - r["t0"] for r in rs]
        hostile[name] = {"requests": len(rs), "statuses": {str(s): sum(r["status"] == s for r in rs)
                                                           for s in sorted({r["status"] for r in rs})},
                         "p50_s": pct(latencies, 50), "max_s": max(latencies),
                         "detail": next((r.get("detail") for r in rs), None)}
    return {"good": phases, "hostile": hostile, "rss_bytes": rss}


# -- 2. replica kills ------------------------------------------------------------------------------------


TARGETS = [  # (label, process title prefix, Serve deployment or None)
    ("ingress", f"ray::ServeReplica:{APP}:ScoringIngress", "ScoringIngress"),
    ("soft-attention", f"ray::ServeReplica:{APP}:SoftAttentionStage", "SoftAttentionStage"),
    ("hard-attention", f"ray::ServeReplica:{APP}:HardAttentionStage", "HardAttentionStage"),
    ("tile reader", "ray::TileReader", None),
]


def wait_healthy(prefix: str, deployment: str | None, expected: int, before: list[int], killed_pid: int,
                 timeout_s: float) -> tuple[float | None, float | None]:
    """Wall-clock times at which a replacement process (a pid of the target's title not there before the
    kill) is first seen, and at which the target is whole again: ``expected`` processes of its title,
    none the killed one, and (a Serve deployment) Serve reporting HEALTHY with ``expected`` RUNNING
    replicas."""
    stop = time.time() + timeout_s
    spawned_at = None
    while time.time() < stop:
        pids = pids_titled(prefix)
        if spawned_at is None and set(pids) - set(before):
            spawned_at = time.time()
        whole = len(pids) >= expected and killed_pid not in pids
        if whole and deployment is not None:
            status, running = deployment_state(deployment)
            whole = status == "HEALTHY" and running >= expected
        if whole:
            return spawned_at, time.time()
        time.sleep(0.1)
    return spawned_at, None


def kill_part(url: str, window_s: float, kill_after_s: float, deadline_s: float,
              targets: list[str] | None = None) -> list[dict]:
    rows = []
    for label, prefix, deployment in TARGETS:
        if targets and label not in targets:
            continue
        pids = pids_titled(prefix)
        expected = len(pids)
        if deployment is not None:
            _, running = deployment_state(deployment)
            assert running == expected, (label, running, pids)
        process = start_load({"url": url, "timeout_s": deadline_s + 30, "max_s": window_s,
                              "clients": good_clients(4, 100_000, seed0=200)})
        time.sleep(kill_after_s)
        victim = pids[0]
        killed_at = time.time()
        os.kill(victim, signal.SIGKILL)
        spawned_at, healthy_at = wait_healthy(prefix, deployment, expected, pids, victim, timeout_s=window_s + 30)
        records = finish_load(process, window_s + deadline_s + 60)
        after = [r for r in records if r["t1"] >= killed_at]  # answered after the kill
        failed = [r for r in records if r["status"] != 200]
        last_failure_t0 = max((r["t0"] for r in failed), default=killed_at)
        first_ok_after = min((r["t1"] for r in after if r["status"] == 200 and r["t0"] >= last_failure_t0),
                             default=None)
        rows.append({
            "target": label, "pid": victim, "replicas": expected, "requests": len(records),
            "answered_after_kill": len(after), "failed": len(failed),
            "failed_statuses": [r["status"] for r in failed],
            "failures_503_json_retry_after": sum(r["status"] == 503 and r["json"] and bool(r["retry_after"])
                                                 for r in failed),
            "failure_details": sorted({(r.get("detail") or "")[:160] for r in failed}),
            "recovery_requests_s": None if first_ok_after is None else first_ok_after - killed_at,
            "recovery_healthy_s": None if healthy_at is None else healthy_at - killed_at,
            "replacement_process_seen_s": None if spawned_at is None else spawned_at - killed_at,
            "max_latency_after_kill_s": max((r["t1"] - r["t0"] for r in after), default=None),
        })
        print(f"  kill {label}: {rows[-1]}", flush=True)
    return rows


# -- output ----------------------------------------------------------------------------------------------


def tables(result: dict) -> str:
    lines: list[str] = []
    if "kills" not in result:
        result = {**result, "kills": []}
    if "hostile" not in result:
        return tables_kills(result, lines)
    lines += ["### Hostile declarations with 4 good clients", "",
             "| phase | good requests (200 / sent) | good p50 ms | good p99 ms | good max ms | p99 vs quiet | "
             "throughput req/s |", "|---|---|---|---|---|---|---|"]
    good = result["hostile"]["good"]
    quiet_p99 = good["quiet"]["p99_s"]
    for phase, row in good.items():
        ratio = f"{row['p99_s'] / quiet_p99:.2f}x" if row["p99_s"] and quiet_p99 else "-"
        lines.append(f"| {phase} | {row['ok']} / {row['requests']} | {ms(row['p50_s'])} | {ms(row['p99_s'])} | "
                     f"{ms(row['max_s'])} | {ratio} | {row['throughput_rps']:.2f} |")
    lines += ["", "| hostile request | answers | statuses | p50 ms | max ms |", "|---|---|---|---|---|"]
    for name, row in result["hostile"]["hostile"].items():
        statuses = ", ".join(f"{s}: {n}" for s, n in row["statuses"].items())
        lines.append(f"| {name} | {row['requests']} | {statuses} | {ms(row['p50_s'])} | {ms(row['max_s'])} |")
    rss = result["hostile"]["rss_bytes"]
    lines += ["", "| service RSS (Ray worker processes) | MiB |", "|---|---|"]
    lines += [f"| {key} | {value / 2**20:.0f} |" for key, value in rss.items()]
    lines.append("")
    return tables_kills(result, lines)


def tables_kills(result: dict, lines: list[str]) -> str:
    if not result["kills"]:
        return "\n".join(lines)
    lines += ["### kill -9 of one replica under 4 clients", "",
              "| killed | replicas | requests (answered after kill) | failed | failure statuses | 503 JSON + "
              "Retry-After | requests succeed again after s | replacement process up after s | healthy again after s | "
              "max latency after kill ms |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["kills"]:
        def seconds(value: float | None) -> str:
            return "-" if value is None else f"{value:.2f}"
        lines.append(f"| {row['target']} | {row['replicas']} | {row['requests']} ({row['answered_after_kill']}) | "
                     f"{row['failed']} | {', '.join(map(str, row['failed_statuses'])) or '-'} | "
                     f"{row['failures_503_json_retry_after']} / {row['failed']} | "
                     f"{seconds(row['recovery_requests_s'])} | {seconds(row.get('replacement_process_seen_s'))} | "
                     f"{seconds(row['recovery_healthy_s'])} | "
                     f"{ms(row['max_latency_after_kill_s'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/dual-attention-bench-resilience"))
    parser.add_argument("--requests", type=int, default=40, help="good requests per client per hostile phase")
    parser.add_argument("--hostile-requests", type=int, default=4, help="requests per hostile client")
    parser.add_argument("--kill-window-s", type=float, default=25.0, help="load window around each kill")
    parser.add_argument("--quick", action="store_true", help="fewer requests, shorter kill windows")
    parser.add_argument("--skip-hostile", action="store_true")
    parser.add_argument("--skip-kills", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--kill", action="append", choices=[t[0] for t in TARGETS],
                        help="kill only this target (repeatable; default: every target)")
    parser.add_argument("--no-proxy-retry", action="store_true",
                        help="start Serve's proxy without serve.proxy_retry's middleware (the 'before' of issue 14.3)")
    parser.add_argument("--loadgen", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.loadgen:
        spec = json.loads(Path(args.loadgen).read_text())
        os.unlink(args.loadgen)
        print(json.dumps(asyncio.run(_generate(spec))))
        return 0
    if args.quick:
        args.requests, args.hostile_requests, args.kill_window_s = 8, 2, 15.0

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    from serve.settings import patient_serve_proxy

    if args.no_proxy_retry:
        os.environ["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] = ""
    patient_serve_proxy()  # as `dual-attention serve` starts it: the proxy's middleware, its readiness wait
    import ray
    from bench_serve import free_port, prepare
    from ray import serve

    args.work_dir.mkdir(parents=True, exist_ok=True)
    checkpoint, slide = prepare(args.work_dir, "cpu-small", 4096)
    for name, (side, tile, blank) in HOSTILE.items():
        if not (slide.parent / name).is_file():
            write_declared_slide(slide.parent / name, side, tile, blank)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    load_start = os.getloadavg()
    ray.init(address="local", num_cpus=8, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    result: dict = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "quick": args.quick,
                    "proxy_retry": not args.no_proxy_retry,
                    "command": " ".join([Path(sys.executable).name, *sys.argv]),
                    "machine": {"cores": os.cpu_count(), "load_average_start": load_start}}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        result["deployment"] = deploy(checkpoint, slide.parent, args.work_dir)
        deadline_s = float(result["deployment"]["args"]["request_deadline_s"])
        print(f"deployed {result['deployment']}; load average {os.getloadavg()}", flush=True)
        finish_load(start_load({"url": url, "timeout_s": 120, "max_s": 60, "clients": good_clients(4, 3)}), 200)
        titles = sorted(p.info["cmdline"][0] for p in ray_processes())
        print("ray processes:", ", ".join(titles), flush=True)
        if not args.skip_hostile:
            print("1. hostile declarations", flush=True)
            result["hostile"] = hostile_part(url, slide.parent, args.requests, args.hostile_requests,
                                            deadline_s, max_s=300)
        if not args.skip_kills:
            print("2. replica kills", flush=True)
            result["kills"] = kill_part(url, args.kill_window_s, kill_after_s=args.kill_window_s / 3,
                                        deadline_s=deadline_s, targets=args.kill)
    finally:
        result["machine"]["load_average_end"] = os.getloadavg()
        serve.shutdown()
        ray.shutdown()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {args.out}; load average {load_start} at start, {result['machine']['load_average_end']} at end\n")
    print(tables(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
