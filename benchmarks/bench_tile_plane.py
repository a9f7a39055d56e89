"""Tile-plane benchmark: tiles/s of a raw single-process OpenSlide loop vs the TilePool, same tiles, same
run; and the memory of the pool while streaming 10,000 tiles.

    .venv/bin/python benchmarks/bench_tile_plane.py                  # full run, prints markdown tables
    .venv/bin/python benchmarks/bench_tile_plane.py --size 8192 --n-tiles 300 --memory-tiles 1000  # quick

The slide (synthetic, 32768² level 0 = 1.07 gigapixels, 40x JPEG pyramid) is written once into
``--slide-dir`` (outside git) by ``dual_attention.synthetic.write_synthetic_slide`` and reused.

Throughput: every configuration reads the same seeded random 256² level-0 boxes; a raw run comes before and
after every pool run, and each pool row is compared with the mean of those two (drift from other load).
``ratio = pool rate / (cores x raw rate)``; ``efficiency = pool rate / (min(actors, cores) x raw rate)``.
CPU seconds of the driver and all its descendants (actors, raylet, GCS) per tile are measured too: on a
shared machine wall-clock ratios drift with other load, CPU time per tile much less.

Memory: VmRSS / RssAnon / VmHWM from /proc of the driver and every reader actor, sampled every 50 ms while
10,000 tiles stream through ``TilePool.iter_read`` (bounded in flight) to a consumer that drops them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

from dual_attention.slides import Level0Box, open_slide  # noqa: E402
from dual_attention.synthetic import write_synthetic_slide  # noqa: E402


def ensure_slide(slide_dir: Path, size: int) -> Path:
    path = slide_dir / f"synthetic-her2-{size}.tiff"
    if path.is_file():
        return path
    slide_dir.mkdir(parents=True, exist_ok=True)
    partial = slide_dir / f".partial-{path.name}"
    print(f"writing {path} ({size}x{size} level 0), once ...", flush=True)
    started = time.perf_counter()
    write_synthetic_slide(partial, "her2", label=2, seed=2026, width_level0_px=size, height_level0_px=size,
                          progress=True)
    os.replace(partial, path)
    print(f"  written in {time.perf_counter() - started:.0f} s, {path.stat().st_size / 2**20:.0f} MiB", flush=True)
    return path


def random_boxes(size: int, n: int, tile_px: int, seed: int) -> list[Level0Box]:
    rng = np.random.default_rng(seed)
    xy = rng.integers(0, size - tile_px, size=(n, 2))
    return [Level0Box(int(x), int(y), tile_px, tile_px) for x, y in xy]


def slide_size(slide_path: Path) -> int:
    with open_slide(slide_path) as slide:
        return min(slide.dimensions)


@dataclass
class Run:
    """One timed pass over the tiles: wall rate, and CPU seconds spent by the driver and all its descendants
    (actors, raylet, GCS, idle workers), so overhead shows even when other load distorts wall time."""

    tiles: int
    wall_s: float
    cpu_s: float

    @property
    def rate(self) -> float:
        return self.tiles / self.wall_s

    @property
    def cpu_ms_per_tile(self) -> float:
        return 1000 * self.cpu_s / self.tiles


_TICKS = os.sysconf("SC_CLK_TCK")


def tree_cpu_s(root_pid: int) -> float:
    """utime + stime of ``root_pid`` and every descendant now alive (from /proc)."""
    parent: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            after_comm = stat_file.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        pid = int(stat_file.parent.name)
        parent[pid] = int(after_comm[1])
        cpu[pid] = (int(after_comm[11]) + int(after_comm[12])) / _TICKS
    total = 0.0
    for pid, seconds in cpu.items():
        ancestor = pid
        while ancestor not in (0, 1, root_pid) and ancestor in parent:
            ancestor = parent[ancestor]
        if ancestor == root_pid:
            total += seconds
    return total


def raw_run(slide_path: Path, boxes: list[Level0Box]) -> Run:
    """One process, one open slide, a plain loop of reads (same read code the actors run)."""
    with open_slide(slide_path) as slide:
        cpu_started = time.process_time()
        started = time.perf_counter()
        checksum = 0
        for box in boxes:
            checksum += int(slide.read_box(box)[0, 0, 0])
        wall = time.perf_counter() - started
        cpu = time.process_time() - cpu_started
    return Run(len(boxes), wall, cpu)


def pool_run(slide_path: Path, boxes: list[Level0Box], num_actors: int, batch_size: int) -> Run:
    from jobs.runtime.tile_plane import TilePool, TileRequest

    requests = [TileRequest(str(slide_path), box) for box in boxes]
    with TilePool(num_actors=num_actors, batch_size=batch_size, max_in_flight=2 * num_actors) as pool:
        # Warm up on other boxes (actors started, slide open in each) so no timed tile is in OpenSlide's cache.
        warm = random_boxes(slide_size(slide_path), 4 * num_actors * batch_size, boxes[0].width, seed=99)
        pool.read([TileRequest(str(slide_path), box) for box in warm])
        cpu_started = tree_cpu_s(os.getpid())
        started = time.perf_counter()
        checksum = 0
        for tile in pool.iter_read(requests):
            checksum += int(tile[0, 0, 0])
        wall = time.perf_counter() - started
        cpu = tree_cpu_s(os.getpid()) - cpu_started
    return Run(len(boxes), wall, cpu)


# -- memory --------------------------------------------------------------------------------------------------


def proc_status_kib(pid: int) -> dict[str, int]:
    values: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssShmem", "VmHWM"):
                values[key] = int(rest.split()[0])
    except (OSError, ValueError):
        pass
    return values


def _child_named(name: str) -> int | None:
    """A child process of this driver with this command name (the local Ray node's raylet)."""
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)
            comm = fields[0].split("(", 1)[1]
            ppid = int(fields[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if comm == name and ppid == os.getpid():
            return int(stat_file.parent.name)
    return None


@dataclass
class MemoryTrace:
    peak_rss_mib: dict[str, float]
    peak_anon_mib: dict[str, float]
    peak_shmem_mib: dict[str, float]
    start_rss_mib: dict[str, float]
    rss_at_10pct_mib: dict[str, float]
    end_rss_mib: dict[str, float]
    tiles: int
    seconds: float


def memory_run(slide_path: Path, boxes: list[Level0Box], num_actors: int, batch_size: int,
               max_in_flight: int) -> MemoryTrace:
    from jobs.runtime.tile_plane import TilePool, TileRequest

    requests = [TileRequest(str(slide_path), box) for box in boxes]
    with TilePool(num_actors=num_actors, batch_size=batch_size, max_in_flight=max_in_flight) as pool:
        pids = {"driver": os.getpid()}
        for i, location in enumerate(pool.actor_locations()):
            pids[f"actor {i}"] = location["pid"]
        raylet = _child_named("raylet")
        if raylet is not None:  # hosts the object store (its shared memory shows as RssShmem)
            pids["raylet (object store)"] = raylet
        peak_rss = {name: 0.0 for name in pids}
        peak_anon = {name: 0.0 for name in pids}
        peak_shmem = {name: 0.0 for name in pids}
        stop = threading.Event()

        def snapshot() -> dict[str, float]:
            return {name: proc_status_kib(pid).get("VmRSS", 0) / 1024 for name, pid in pids.items()}

        def sample() -> None:
            while not stop.is_set():
                for name, pid in pids.items():
                    status = proc_status_kib(pid)
                    peak_rss[name] = max(peak_rss[name], status.get("VmRSS", 0) / 1024)
                    peak_anon[name] = max(peak_anon[name], status.get("RssAnon", 0) / 1024)
                    peak_shmem[name] = max(peak_shmem[name], status.get("RssShmem", 0) / 1024)
                time.sleep(0.05)

        start_rss = snapshot()
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started = time.perf_counter()
        at_10pct: dict[str, float] = {}
        n = 0
        for n, tile in enumerate(pool.iter_read(requests), start=1):
            assert tile.shape == (boxes[0].height, boxes[0].width, 3)
            if n == len(requests) // 10:
                at_10pct = snapshot()
        seconds = time.perf_counter() - started
        end_rss = snapshot()
        stop.set()
        sampler.join()
    return MemoryTrace(peak_rss, peak_anon, peak_shmem, start_rss, at_10pct, end_rss, n, seconds)


# -- main ----------------------------------------------------------------------------------------------------


def throughput(args: argparse.Namespace, slide_path: Path, boxes: list[Level0Box]) -> None:
    """Raw runs interleave with the pool runs; each pool row is compared with the raw runs just before and
    just after it, so drifting load from other processes affects both sides alike."""
    configs = [(2, b) for b in args.batch_sizes]
    configs += [(a, args.batch_size) for a in args.actors if (a, args.batch_size) not in configs]
    raws = [raw_run(slide_path, boxes)]
    print(f"raw single process: {raws[-1].rate:.0f} tiles/s", flush=True)
    rows: list[tuple[int, int, Run, float, float]] = []
    for num_actors, batch_size in configs:
        run = pool_run(slide_path, boxes, num_actors, batch_size)
        raws.append(raw_run(slide_path, boxes))
        raw = statistics.mean([raws[-2].rate, raws[-1].rate])
        raw_cpu_ms = statistics.mean([raws[-2].cpu_ms_per_tile, raws[-1].cpu_ms_per_tile])
        rows.append((num_actors, batch_size, run, raw, raw_cpu_ms))
        print(f"pool {num_actors} actors, batch {batch_size}: {run.rate:.0f} tiles/s, {run.cpu_ms_per_tile:.2f} "
              f"CPU ms/tile; raw after it: {raws[-1].rate:.0f} tiles/s", flush=True)
    print()
    print(f"Raw single-process runs: {', '.join(f'{r.rate:.0f}' for r in raws)} tiles/s "
          f"({statistics.mean(r.cpu_ms_per_tile for r in raws):.2f} CPU ms per tile). "
          f"Load average now {os.getloadavg()}.")
    print()
    print("| actors | batch size | pool tiles/s | raw tiles/s (runs before + after) | pool ÷ (cores × raw) "
          "| pool ÷ (min(actors, cores) × raw) | CPU ms per tile, all processes | raw CPU ms ÷ pool CPU ms |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for num_actors, batch_size, run, raw, raw_cpu_ms in sorted(rows, key=lambda r: (r[0], r[1])):
        efficiency = run.rate / (min(num_actors, args.cores) * raw)
        print(f"| {num_actors} | {batch_size} | {run.rate:.0f} | {raw:.0f} | {run.rate / (args.cores * raw):.2f} | "
              f"{efficiency:.2f} | {run.cpu_ms_per_tile:.2f} | {raw_cpu_ms / run.cpu_ms_per_tile:.2f} |")
    print()


def print_memory(args: argparse.Namespace, trace: MemoryTrace) -> None:
    print()
    print(f"Memory, streaming {trace.tiles} tiles ({args.tile_px}², {3 * args.tile_px**2 / 1024:.0f} KiB each, "
          f"{trace.tiles * 3 * args.tile_px**2 / 2**30:.1f} GiB in all) in {trace.seconds:.1f} s, 2 actors, batch "
          f"{args.batch_size}, max 4 batches in flight:")
    print()
    print("| process | RSS at start (MiB) | RSS after 10% (MiB) | RSS at end (MiB) | peak RSS (MiB) "
          "| peak private (RssAnon, MiB) | peak shared (RssShmem, MiB) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in trace.peak_rss_mib:
        print(f"| {name} | {trace.start_rss_mib[name]:.0f} | {trace.rss_at_10pct_mib.get(name, 0):.0f} | "
              f"{trace.end_rss_mib[name]:.0f} | {trace.peak_rss_mib[name]:.0f} | {trace.peak_anon_mib[name]:.0f} | "
              f"{trace.peak_shmem_mib[name]:.0f} |")
    print()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slide-dir", type=Path, default=Path("/tmp/tile_plane_bench"))
    parser.add_argument("--size", type=int, default=32768, help="level-0 side of the synthetic slide")
    parser.add_argument("--tile-px", type=int, default=256)
    parser.add_argument("--n-tiles", type=int, default=2000, help="tiles per throughput configuration")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 64, 128])
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--batch-size", type=int, default=64, help="batch size for the actor sweep and memory run")
    parser.add_argument("--memory-tiles", type=int, default=10000)
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args(argv)

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    import ray

    slide_path = ensure_slide(args.slide_dir, args.size)
    boxes = random_boxes(args.size, args.n_tiles, args.tile_px, args.seed)
    print(f"slide {slide_path} ({args.size}² level 0, {slide_path.stat().st_size / 2**20:.0f} MiB); "
          f"{args.n_tiles} random {args.tile_px}² level-0 tiles; cores {args.cores}; load {os.getloadavg()}",
          flush=True)
    raw_run(slide_path, boxes)  # warm the page cache: every run reads from memory, not disk
    ray.init(num_cpus=4 * args.cores, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(PROJECT_ROOT)}})
    try:
        if not args.skip_throughput:
            throughput(args, slide_path, boxes)
        if not args.skip_memory:
            memory_boxes = random_boxes(args.size, args.memory_tiles, args.tile_px, args.seed + 1)
            trace = memory_run(slide_path, memory_boxes, 2, args.batch_size, max_in_flight=4)
            print_memory(args, trace)
    finally:
        ray.shutdown()
    print(f"Load average at the end: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
