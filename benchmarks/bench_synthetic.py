"""Synthetic slide generation: throughput and peak memory, a small slide beside a gigapixel one, plus the
wall time of the quickstart-size cohort.

Each slide is written by a fresh interpreter (``--one``) so that its peak RSS (``ru_maxrss``) is its own;
the bare interpreter with the same imports is measured too, so the slide's share is visible. Streaming
means the gigapixel slide's peak RSS should stay close to the small one's, not 64x it.

    .venv/bin/python benchmarks/bench_synthetic.py                      # 4096^2 vs 32768^2, cohort 16 x 4096^2
    .venv/bin/python benchmarks/bench_synthetic.py --large-px 16384     # quicker

Prints a markdown table; the numbers in benchmarks/RESULTS.md come from here.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _one(size_px: int, out: Path) -> None:
    """Child: write one slide (or nothing when size is 0) and print its measurements as JSON."""
    from dual_attention.synthetic import write_synthetic_slide
    from dual_attention.synthetic.pyramid import _pyramid_pixels

    wall, cpu = time.perf_counter(), time.process_time()
    file_bytes, levels, mpp = 0, 0, None
    if size_px:
        path = out / f"slide{size_px}.tiff"
        write_synthetic_slide(path, "her2", 3, 1234, size_px, size_px)
        wall_s, cpu_s = time.perf_counter() - wall, time.process_time() - cpu
        file_bytes = path.stat().st_size
        import openslide

        osr = openslide.OpenSlide(str(path))  # the written pyramid as OpenSlide sees it
        levels, mpp = osr.level_count, float(osr.properties[openslide.PROPERTY_NAME_MPP_X])
        osr.close()
    else:
        wall_s, cpu_s = time.perf_counter() - wall, time.process_time() - cpu
    record = {
        "size_px": size_px,
        "level0_mp": size_px * size_px / 1e6,
        "pyramid_mp": _pyramid_pixels(size_px, size_px) / 1e6 if size_px else 0.0,
        "wall_s": wall_s,
        "cpu_s": cpu_s,
        "openslide_levels": levels,
        "openslide_mpp": mpp,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "file_mib": file_bytes / 2**20,
    }
    print(json.dumps(record))


def _cpu_self_and_children() -> float:
    """CPU seconds of this process and its finished children (the cohort's worker processes)."""
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def _run_child(size_px: int, out: Path) -> dict:
    result = subprocess.run(
        [sys.executable, __file__, "--one", str(size_px), "--out", str(out)], check=True, capture_output=True, text=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small-px", type=int, default=4096)
    parser.add_argument("--large-px", type=int, default=32768)
    parser.add_argument("--cohort-slides", type=int, default=16)
    parser.add_argument("--cohort-px", type=int, default=4096)
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help="scratch folder (default: a temp folder)")
    args = parser.parse_args()
    if args.one is not None:
        _one(args.one, args.out)
        return

    with tempfile.TemporaryDirectory(prefix="bench-synth-", dir=args.out) as scratch:
        out = Path(scratch)
        bare = _run_child(0, out)
        rows = [_run_child(args.small_px, out), _run_child(args.large_px, out)]
        for row in rows:
            (out / f"slide{row['size_px']}.tiff").unlink()

        from dual_attention.synthetic import write_cohort

        start, cpu_before = time.perf_counter(), _cpu_self_and_children()
        write_cohort(out / "cohort", "her2", args.cohort_slides, 0, slide_level0_px=args.cohort_px, progress=False)
        cohort_wall_s = time.perf_counter() - start
        cohort_cpu_s = _cpu_self_and_children() - cpu_before

    load = os.getloadavg()[0]
    print(f"machine: {os.cpu_count()} cores, load average {load:.1f} at the end (the cores are shared; CPU time "
          "is the steadier figure)")
    print(f"bare interpreter with the imports: peak RSS {bare['peak_rss_mib']:.0f} MiB")
    print()
    print("| slide (level 0) | level-0 MP | pyramid MP | wall s | CPU s | MP/s (level 0, wall) | MP/s (level 0, CPU) "
          "| peak RSS MiB | file MiB | OpenSlide levels, mpp |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['size_px']}² | {row['level0_mp']:.0f} | {row['pyramid_mp']:.0f} | {row['wall_s']:.1f} | "
            f"{row['cpu_s']:.1f} | {row['level0_mp'] / row['wall_s']:.1f} | {row['level0_mp'] / row['cpu_s']:.1f} | "
            f"{row['peak_rss_mib']:.0f} | {row['file_mib']:.1f} | {row['openslide_levels']}, {row['openslide_mpp']} |"
        )
    small, large = rows
    print(
        f"| ratio large/small | {large['level0_mp'] / small['level0_mp']:.0f}x | | {large['wall_s'] / small['wall_s']:.1f}x"
        f" | {large['cpu_s'] / small['cpu_s']:.1f}x | | | {large['peak_rss_mib'] / small['peak_rss_mib']:.2f}x | | |"
    )
    print()
    print(f"cohort: {args.cohort_slides} HER2 slides of {args.cohort_px}² (default workers) written in "
          f"{cohort_wall_s:.1f} s wall, {cohort_cpu_s:.1f} s CPU (all processes)")


if __name__ == "__main__":
    main()
