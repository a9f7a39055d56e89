"""The cohort scoring job (``jobs.score_cohort``, Ray Data) against its targets (issue 13, issue 12's slides/h).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_cohort_job.py                # every part, one run
    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_cohort_job.py --only job,giga

Slides: ``--n-slides`` synthetic HER2 slides of ``--slide-px``² (``dual_attention.synthetic.write_cohort``,
reused from ``--work-dir`` when there); model: a fresh cpu-small model (seed 0; scoring costs the same
whatever the weights), saved as a checkpoint. Parts, all written into ``benchmarks/results/cohort_job.json``:

* ``inprocess``: ``jobs.score.score_slide_path`` (what ``dual-attention score`` runs) over the same slides,
  one after another in this process, torch on all cores: wall seconds per slide.
* ``job``: ``python -m jobs.score_cohort`` on all slides (its own Ray instance, 4 logical CPUs), watched from
  here: wall time (the job's own "in X s", and the process's), per-core busy fraction of the machine (psutil,
  sampled every 0.5 s: other users' load counts too) and the job's own CPU share (CPU seconds of the driver
  and every process it started ÷ (wall × cores)), driver peak RSS (VmHWM). The same with ``--small-n`` slides
  (``job_small``) gives the driver's RSS for 20 vs 200 slides, and the two give the job's fixed start
  and its marginal seconds per slide. ``job_split`` / ``job_split_small``: the same with ``--stages split``
  (the three-operator pipeline that GPU clusters run), for the before/after of fusing the stages on CPUs.
* ``start``: where the job's fixed start goes, each in a fresh process as the job runs (``--start-child``):
  seconds to import ``jobs.score_cohort``, load the model, start Ray, then from Ray started to the pipeline's
  first batch and to its last; and Ray's own floor, a trivial Ray Data ``map`` of the same rows through the
  same number of actors (no torch in them) from Ray started to its first batch.
* ``window``: ``python -m jobs.baselines sliding-window`` scoring the same slides (a ResNet18 trained for one
  epoch on 8 slides first; throughput does not depend on the weights): slides per hour beside the job's.
* ``cluster``: the same job on a local 2-node cluster (``ray.cluster_utils.Cluster``, 4 logical CPUs per
  node): lost and duplicated rows against the input, and agreement with the 1-node run.
* ``kill``: the job SIGKILLed (driver) once about half the slides are written, then re-run: every slide
  must end with exactly one row, its tiles once.
* ``giga``: paper-her2 sizes (untrained), one ``--giga-px``² slide (written once into ``--work-dir``)
  scored ``--giga-slides`` times under different slide ids (different seeds, so different tiles) by the
  cohort job: gigapixel slides per hour, and each stage's seconds (the job's table, and an in-process
  ``score`` profile).

Wall times on a shared machine are inflated by other users' jobs: the load average is recorded.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))
RESULTS = PROJECT_ROOT / "benchmarks" / "results" / "cohort_job.json"
PARTS = ("inprocess", "job", "start", "window", "cluster", "kill", "giga")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # as the tests: a private local instance needs no token
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

from dual_attention.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from dual_attention.config import preset  # noqa: E402
from dual_attention.manifest import ManifestRow, manifest_rows, write_manifest  # noqa: E402
from dual_attention.models import DualAttentionModel  # noqa: E402
from dual_attention.pipeline import slide_seed  # noqa: E402
from dual_attention.profiling import StageTimer  # noqa: E402
from jobs.score import score_slide_path  # noqa: E402

psutil = importlib.import_module("psutil")  # Ray's vendored copy (ray/thirdparty_files), on the path after `import ray`

SEED = 0
PROGRESS_LINE = re.compile(r"^\d+/\d+ slides: ", re.MULTILINE)  # CohortReport.progress_line


def load() -> list[float]:
    return [round(v, 1) for v in os.getloadavg()]


# -- inputs -------------------------------------------------------------------------------------------------


def cohort(work: Path, n_slides: int, slide_px: int) -> Path:
    from dual_attention.synthetic import write_cohort

    folder = work / f"cohort-{n_slides}x{slide_px}"
    manifest = folder / "manifest.parquet"
    if not manifest.exists():
        started = time.perf_counter()
        write_cohort(folder, "her2", n_slides=n_slides, seed=13, slide_level0_px=slide_px, n_folds=4, progress=False)
        print(f"[cohort] {n_slides} slides of {slide_px}² written in {time.perf_counter() - started:.0f} s", flush=True)
    return manifest


def sub_manifest(manifest: Path, n: int, name: str) -> Path:
    rows = manifest_rows(manifest)[:n]
    return write_manifest(rows, manifest.parent / name)


def checkpoint(work: Path, preset_name: str) -> Path:
    path = work / f"ckpt-{preset_name}"
    if not (path / "model.pt").exists():
        torch.manual_seed(0)
        config = preset(preset_name)
        save_checkpoint(path, DualAttentionModel(config), config)
    return path.resolve()


# -- watching a job from outside --------------------------------------------------------------------------


class Watch:
    """Samples, while a subprocess runs: per-core busy % of the machine, the CPU seconds of the process and
    every process under it (the largest seen per pid, so processes that exit keep their share), its VmHWM."""

    def __init__(self, pid: int, interval_s: float = 0.5, log: Path | None = None) -> None:
        self.pid, self.interval_s, self.log = pid, interval_s, log
        self.cpu_s: dict[int, float] = {}
        self.per_core: list[list[float]] = []
        self.sample_at_s: list[float] = []  # each sample's time since the start, and the job's CPU s by then
        self.job_cpu_at_sample: list[float] = []
        self.progress_lines_at_s: list[float] = []  # when each of the job's progress lines was first seen
        self.driver_hwm_bytes = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        psutil.cpu_percent(percpu=True)  # the first call only sets the reference
        self.started = time.perf_counter()
        self.thread.start()

    def descendants(self) -> list[Any]:
        try:
            root = psutil.Process(self.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def _progress_lines(self) -> int:
        if self.log is None or not self.log.exists():
            return 0
        return len(PROGRESS_LINE.findall(self.log.read_text(errors="replace")))

    def _run(self) -> None:
        while not self.stop.wait(self.interval_s):
            self.per_core.append(psutil.cpu_percent(percpu=True))
            now = time.perf_counter() - self.started
            self.sample_at_s.append(now)
            seen = self._progress_lines()
            self.progress_lines_at_s += [now] * (seen - len(self.progress_lines_at_s))
            for proc in self.descendants():
                try:
                    times = proc.cpu_times()
                    self.cpu_s[proc.pid] = max(self.cpu_s.get(proc.pid, 0.0), times.user + times.system)
                    if proc.pid == self.pid:
                        for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                            if line.startswith("VmHWM:"):
                                self.driver_hwm_bytes = max(self.driver_hwm_bytes, int(line.split()[1]) * 1024)
                except (psutil.NoSuchProcess, psutil.AccessDenied, FileNotFoundError, ProcessLookupError):
                    continue
            self.job_cpu_at_sample.append(sum(self.cpu_s.values()))

    def finish(self) -> dict[str, Any]:
        self.stop.set()
        self.thread.join()
        wall = time.perf_counter() - self.started
        cores = psutil.cpu_count() or 1
        busy = np.mean(np.asarray(self.per_core), axis=0) / 100 if self.per_core else np.zeros(cores)
        job_cpu = sum(self.cpu_s.values())
        return {"process_wall_s": round(wall, 2), "machine_busy_per_core": [round(float(b), 3) for b in busy],
                "job_cpu_s": round(job_cpu, 2), "job_cpu_share_of_cores": round(job_cpu / (wall * cores), 3),
                "driver_peak_rss_bytes": self.driver_hwm_bytes, "cores": cores,
                "scoring_phase": self.scoring_phase(cores)}

    def scoring_phase(self, cores: int) -> dict[str, Any] | None:
        """Busy fractions between the job's first and last progress line (a line per part written), i.e.
        without Ray's start, the actors' imports and the shutdown; None with fewer than two lines seen or
        fewer than two samples between them (psutil's per-core figure covers the interval ending at a sample)."""
        if len(self.progress_lines_at_s) < 2:
            return None
        first_s, last_s = self.progress_lines_at_s[0], self.progress_lines_at_s[-1]
        inside = [i for i, t in enumerate(self.sample_at_s) if first_s < t <= last_s]
        if len(inside) < 2:
            return None
        busy = np.mean(np.asarray([self.per_core[i] for i in inside]), axis=0) / 100
        # CPU s of the job's processes from the sample at the first line to the last sample inside
        at0, at1 = inside[0] - 1, inside[-1]
        span_s = self.sample_at_s[at1] - self.sample_at_s[at0]
        job_cpu = self.job_cpu_at_sample[at1] - self.job_cpu_at_sample[at0]
        return {"first_progress_line_s": round(first_s, 2), "last_progress_line_s": round(last_s, 2),
                "progress_lines": len(self.progress_lines_at_s), "samples": len(inside),
                "machine_busy_per_core": [round(float(b), 3) for b in busy],
                "job_cpu_share_of_cores": round(job_cpu / (span_s * cores), 3)}


def python_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "PYTHONUNBUFFERED": "1"}


def run_watched(args: list[str], log: Path, kill_when: Any = None) -> dict[str, Any]:
    """Run ``python args`` watched; ``kill_when()`` true -> SIGKILL the driver (then the processes it
    started, by pid, that outlive it). Returns the watch's figures, the exit code and the output."""
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, *args], cwd=PROJECT_ROOT, env=python_env(), stdout=out,
                                stderr=subprocess.STDOUT)
        watch = Watch(proc.pid, log=log)
        killed = False
        while proc.poll() is None:
            time.sleep(0.25)
            if kill_when is not None and not killed and kill_when():
                started_by_it = [p.pid for p in watch.descendants() if p.pid != proc.pid]
                os.kill(proc.pid, signal.SIGKILL)
                killed = True
                proc.wait()
                time.sleep(3.0)  # Ray's own processes notice the driver's death and exit
                for pid in started_by_it:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        figures = watch.finish()
    text = log.read_text()
    figures |= {"exit_code": proc.returncode, "killed": killed}
    found = re.search(r"in ([0-9.]+) s; outputs", text)
    figures["job_elapsed_s"] = float(found.group(1)) if found else None
    return figures


def slide_rows_written(out: Path) -> list[dict[str, Any]]:
    """Every row of every slides part (not de-duplicated: a duplicate must show)."""
    rows: list[dict[str, Any]] = []
    for part in sorted((out / "slides").glob("part-*.parquet")):
        rows += pq.read_table(part).to_pylist()
    return rows


def rows_check(out: Path, expected_ids: list[str]) -> dict[str, Any]:
    rows = slide_rows_written(out)
    counts = Counter(r["slide_id"] for r in rows)
    tiles = pq.read_table(out / "tiles").to_pylist() if (out / "tiles").exists() else []
    tile_keys = Counter((t["slide_id"], t["tile_index"]) for t in tiles)
    n_tiles = {r["slide_id"]: r["n_tiles"] for r in rows if r["status"] == "ok"}
    tiles_per_slide = Counter(t["slide_id"] for t in tiles)
    return {"rows": len(rows), "lost": len(set(expected_ids) - set(counts)),
            "duplicated": sum(c - 1 for c in counts.values() if c > 1),
            "unexpected": len(set(counts) - set(expected_ids)), "errors": sum(r["status"] != "ok" for r in rows),
            "duplicated_tiles": sum(c - 1 for c in tile_keys.values() if c > 1),
            "slides_with_wrong_tile_count": sum(tiles_per_slide.get(s, 0) != n for s, n in n_tiles.items())}


def job_args(ckpt: Path, manifest: Path, out: Path, args: argparse.Namespace, stages: str = "auto") -> list[str]:
    return ["-m", "jobs.score_cohort", "--model", str(ckpt), "--manifest", str(manifest), "--out", str(out),
            "--seed", str(SEED), "--propose-actors", str(args.propose_actors), "--concurrency",
            str(args.concurrency), "--stages", stages, "--quiet"]


def stage_means(out: Path) -> dict[str, float]:
    rows = [r for r in slide_rows_written(out) if r["status"] == "ok"]
    return {k: round(float(np.mean([r[k] for r in rows])), 4)
            for k in ("thumbnail_s", "propose_s", "read_s", "agent_s", "wall_time_s")} if rows else {}


# -- parts ------------------------------------------------------------------------------------------------


def part_inprocess(manifest: Path, ckpt: Path, probe: int = 10) -> dict[str, Any]:
    """``score`` over every slide in this process with one torch thread, as each of the job's actors has (two
    threads were several times slower under other users' load in earlier runs: 0.85 s vs 0.10 s a slide); the
    first ``probe`` slides are also timed with every core's thread, for the record."""
    model, config, _ = load_checkpoint(ckpt)
    rows = manifest_rows(manifest)

    def score_all(some: list[ManifestRow], timer: StageTimer) -> tuple[float, float]:
        started, cpu_started = time.perf_counter(), time.process_time()
        for row in some:
            score_slide_path(model, config, row.path, slide_seed(SEED, row.slide_id), timer=timer)
        return time.perf_counter() - started, time.process_time() - cpu_started

    probes = {}
    for threads in sorted({1, psutil.cpu_count() or 1}):
        torch.set_num_threads(threads)
        probes[threads] = round(score_all(rows[:probe], StageTimer())[0] / probe, 4)
    torch.set_num_threads(1)
    timer = StageTimer()
    load_before = load()
    wall, cpu = score_all(rows, timer)
    return {"slides": len(rows), "wall_s": round(wall, 2), "wall_per_slide_s": round(wall / len(rows), 4),
            "cpu_per_slide_s": round(cpu / len(rows), 4), "torch_threads": 1,
            "probe_wall_per_slide_s_by_threads": probes,
            "stages_ms_per_slide": {k: round(v / len(rows), 2) for k, v in timer.ms.items()},
            "load_before": load_before, "load_after": load()}


class _NoOpStage:
    """A Ray Data actor that does nothing: the trivial pipeline of ``start_child``."""

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        return row


def start_child(manifest: str, ckpt: str, mode: str) -> dict[str, Any]:
    """One fresh process's start, as ``jobs.score_cohort`` runs it (``mode`` "job"), or the trivial pipeline
    (``mode`` "trivial"): seconds from this function's start to each mark."""
    started = time.perf_counter()
    marks: dict[str, float] = {}

    def mark(name: str) -> None:
        marks[name] = round(time.perf_counter() - started, 2)

    from jobs import score_cohort
    from jobs.runtime.cluster import RaySession
    from jobs.runtime.tracking import load_model_for_cli

    mark("imported")
    model, config, _ = load_model_for_cli(ckpt, None)  # as jobs.score_cohort.main loads it
    mark("model_loaded")
    rows = score_cohort.slides_in_manifest(manifest, config.task)
    with RaySession(log_to_driver=False):
        mark("ray_started")
        if mode == "job":
            batches = score_cohort.scored_batches(model, config, rows)
        else:
            actors = 2  # the fused job's propose_actors + concurrency at their defaults
            ds = ray.data.from_items(rows, override_num_blocks=-(-len(rows) // 8))
            ds = ds.map(_NoOpStage, compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=1)
            batches = ds.iter_batches(batch_size=None)
        for index, _ in enumerate(batches):
            if index == 0:
                mark("first_batch")
        mark("last_batch")
    mark("ray_shut_down")
    return {"mode": mode, "marks_s": marks,
            "ray_started_to_first_batch_s": round(marks["first_batch"] - marks["ray_started"], 2),
            "first_to_last_batch_s": round(marks["last_batch"] - marks["first_batch"], 2)}


def part_start(manifest: Path, ckpt: Path) -> dict[str, Any]:
    out = {}
    for mode in ("job", "trivial"):
        done = subprocess.run([sys.executable, __file__, "--start-child", str(manifest), str(ckpt), mode],
                              cwd=PROJECT_ROOT, env=python_env(), capture_output=True, text=True, check=True)
        out[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def part_job(manifest: Path, ckpt: Path, work: Path, args: argparse.Namespace, tag: str, stages: str = "auto"
             ) -> dict[str, Any]:
    out = work / f"out-{tag}"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    n = len(manifest_rows(manifest))
    load_before = load()
    figures = run_watched(job_args(ckpt, manifest, out, args, stages), work / f"{tag}.log")
    figures |= {"stages": stages, "slides": n, "load_before": load_before, "load_after": load(), "out": str(out),
                "stage_means_s": stage_means(out), "check": rows_check(out, [r.slide_id for r in manifest_rows(manifest)]),
                "propose_actors": args.propose_actors, "concurrency": args.concurrency}
    elapsed = figures["job_elapsed_s"] or figures["process_wall_s"]
    figures["wall_per_slide_s"] = round(elapsed / n, 4)
    figures["process_wall_per_slide_s"] = round(figures["process_wall_s"] / n, 4)
    figures["slides_per_hour"] = round(3600 * n / elapsed, 1)
    figures["job_cpu_per_slide_s"] = round(figures["job_cpu_s"] / n, 4)
    return figures


def part_window(manifest: Path, work: Path) -> dict[str, Any]:
    model_path = work / "window-model" / "sliding_window_resnet18.pt"
    if not model_path.exists():
        train = sub_manifest(manifest, 10, "manifest-window-train.parquet")
        folds = sorted({r.fold for r in manifest_rows(train)})
        subprocess.run([sys.executable, "-m", "jobs.baselines", "sliding-window", "--manifest", str(train),
                        "--out", str(model_path.parent), "--train-folds", ",".join(map(str, folds[1:])),
                        "--test-folds", str(folds[0]), "--epochs", "1", "--train-patches-per-slide", "8",
                        "--quiet"], cwd=PROJECT_ROOT, env=python_env(), check=True, stdout=subprocess.DEVNULL)
    out = work / "out-window"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    n = len(manifest_rows(manifest))
    load_before = load()
    figures = run_watched(["-m", "jobs.baselines", "sliding-window", "--manifest", str(manifest), "--out", str(out),
                           "--model-path", str(model_path), "--quiet"], work / "window.log")
    metrics = json.loads((out / "metrics.json").read_text())
    figures |= {"slides": n, "scored": metrics["n_slides"], "elapsed_s": round(metrics["elapsed_s"], 2),
                "wall_per_slide_s": round(metrics["wall_time_per_slide_s"], 4),
                "slides_per_hour": round(3600 * n / metrics["elapsed_s"], 1),
                "fraction_level0_read": metrics["fraction_level0_read"], "load_before": load_before,
                "load_after": load()}
    return figures


def part_cluster(manifest: Path, ckpt: Path, work: Path, args: argparse.Namespace, one_node_out: Path
                 ) -> dict[str, Any]:
    from ray.cluster_utils import Cluster

    from jobs.score_cohort import read_scores, score_cohort, slides_in_manifest

    model, config, _ = load_checkpoint(ckpt)
    out = work / "out-cluster"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    rows = slides_in_manifest(manifest, "her2")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "include_dashboard": False})
    load_before = load()
    try:
        cluster.add_node(num_cpus=4)
        ray.init(address=cluster.address, log_to_driver=False)
        alive = sum(node["Alive"] for node in ray.nodes())
        started = time.perf_counter()
        report = score_cohort(model, config, rows, out, model_name=str(ckpt), sampler="attention", seed=SEED,
                              concurrency=args.concurrency, propose_actors=args.propose_actors, progress=False)
        elapsed = time.perf_counter() - started
    finally:
        ray.shutdown()
        cluster.shutdown()
    ids = [r["slide_id"] for r in rows]
    check = rows_check(out, ids)
    one = {r["slide_id"]: r for r in read_scores(one_node_out)}
    two = {r["slide_id"]: r for r in read_scores(out)}
    names = config.class_names
    differ = [s for s in ids if s in one and s in two and (
        one[s]["predicted_class"] != two[s]["predicted_class"]
        or not np.allclose([one[s][f"prob_{n}"] for n in names], [two[s][f"prob_{n}"] for n in names], atol=1e-6))]
    return {"nodes_alive": alive, "cpus_per_node": 4, "elapsed_s": round(elapsed, 2), "scored": report.scored,
            "failed": report.failed, "check": check, "one_node_check": rows_check(one_node_out, ids),
            "slides_scoring_differently_from_1_node": len(differ), "load_before": load_before, "load_after": load()}


def part_kill(manifest: Path, ckpt: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    out = work / "out-kill"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    ids = [r.slide_id for r in manifest_rows(manifest)]
    half = len(ids) // 2

    def half_written() -> bool:
        parts = list((out / "slides").glob("part-*.parquet")) if (out / "slides").exists() else []
        try:
            return sum(pq.read_metadata(p).num_rows for p in parts) >= half
        except OSError:  # a part renamed into place while listed
            return False

    first = run_watched(job_args(ckpt, manifest, out, args), work / "kill-first.log", kill_when=half_written)
    at_kill = rows_check(out, ids)
    second = run_watched(job_args(ckpt, manifest, out, args), work / "kill-second.log")
    final = rows_check(out, ids)
    text = (work / "kill-second.log").read_text()
    resumed = re.search(r"\((\d+) already in", text)
    return {"first_run": {k: first[k] for k in ("killed", "exit_code", "process_wall_s")}, "rows_at_kill": at_kill,
            "second_run": {k: second[k] for k in ("exit_code", "process_wall_s", "job_elapsed_s")},
            "skipped_on_rerun": int(resumed.group(1)) if resumed else None, "final": final,
            "every_slide_once": final["lost"] == 0 and final["duplicated"] == 0 and final["duplicated_tiles"] == 0
            and final["slides_with_wrong_tile_count"] == 0}


def part_giga(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    from dual_attention.slides import open_slide
    from dual_attention.synthetic import write_synthetic_slide

    path = work / f"giga-her2-{args.giga_px}.tiff"
    if not path.exists():
        started = time.perf_counter()
        tmp = path.with_suffix(".tmp.tiff")
        write_synthetic_slide(tmp, "her2", 3, seed=4242, width_level0_px=args.giga_px, height_level0_px=args.giga_px)
        tmp.replace(path)
        print(f"[giga] {path} written in {time.perf_counter() - started:.0f} s", flush=True)
    with open_slide(path) as slide:
        dims = tuple(int(v) for v in slide.dimensions)
    ckpt = checkpoint(work, "paper-her2")
    folder = work / "giga-cohort"
    folder.mkdir(exist_ok=True)
    rows = []
    for i in range(args.giga_slides):  # one file under several ids: different seeds, so different tiles
        link = folder / f"giga-{i}.tiff"
        if not link.exists():
            link.symlink_to(path)
        rows.append(ManifestRow(f"giga-{i}", str(link), 3, "her2", fold=0, seed=i))
    manifest = write_manifest(rows, folder / "manifest.parquet")
    model, config, _ = load_checkpoint(ckpt)
    timer = StageTimer()
    torch.set_num_threads(1)  # as each of the job's actors (Ray gives a 1-CPU actor one thread)
    started = time.perf_counter()
    score_slide_path(model, config, path, slide_seed(SEED, "giga-0"), timer=timer)
    inprocess_s = time.perf_counter() - started
    job = part_job(manifest, ckpt, work, args, "giga")
    gigapixels = dims[0] * dims[1] / 1e9
    return {"level0_dims": dims, "gigapixels": round(gigapixels, 3), "preset": "paper-her2",
            "inprocess_score_s": round(inprocess_s, 2), "inprocess_torch_threads": 1,
            "inprocess_stages_ms": {k: round(v, 1) for k, v in timer.ms.items()}, "job": job,
            "gigapixel_slides_per_hour": job["slides_per_hour"]}


# -- report -------------------------------------------------------------------------------------------------


def busy_row(label: str, watched: dict[str, Any]) -> str:
    """A table row of per-core busy fractions and the job's own CPU share against the 85% target."""
    busy, share = watched["machine_busy_per_core"], watched["job_cpu_share_of_cores"]
    return (f"| {label} | {' / '.join(f'{100 * b:.0f}%' for b in busy)} / {100 * share:.0f}% | ≥ 85% each | "
            f"{'yes' if min(busy) >= 0.85 else 'no'} (machine); {'yes' if share >= 0.85 else 'no'} (job) |")


def table(results: dict[str, Any]) -> str:
    lines = ["| measure | figure | target | met |", "|---|---|---|---|"]
    inproc, job = results.get("inprocess"), results.get("job")
    if inproc and results.get("inprocess_after"):  # the reference: in-process before and after the job runs
        after = results["inprocess_after"]
        inproc = {"wall_per_slide_s": (inproc["wall_per_slide_s"] + after["wall_per_slide_s"]) / 2,
                  "cpu_per_slide_s": (inproc["cpu_per_slide_s"] + after["cpu_per_slide_s"]) / 2}
        results["inprocess_mean_wall_per_slide_s"] = round(inproc["wall_per_slide_s"], 4)
    if inproc and job:
        ratio = job["wall_per_slide_s"] / inproc["wall_per_slide_s"]
        results["ratio_job_over_inprocess"] = round(ratio, 3)
        lines.append(f"| cohort job wall s/slide ÷ in-process `score` (mean of before and after; {job['slides']} slides) | "
                     f"{job['wall_per_slide_s']:.3f} ÷ {inproc['wall_per_slide_s']:.3f} = **{ratio:.2f}** "
                     f"(process wall incl. start-up: {job['process_wall_per_slide_s'] / inproc['wall_per_slide_s']:.2f}) "
                     f"| ≤ 1.2 | {'yes' if ratio <= 1.2 else 'no'} |")
        lines.append(f"| CPU s/slide: the job (every process, start-up included) ÷ in-process | "
                     f"{job['job_cpu_per_slide_s']:.3f} ÷ {inproc['cpu_per_slide_s']:.3f} = "
                     f"{job['job_cpu_per_slide_s'] / inproc['cpu_per_slide_s']:.2f} | (load-independent view) | |")
        lines.append(busy_row("cores busy during the job (machine, all users) / the job's own CPU share", job))
        phase = job.get("scoring_phase")
        if phase:
            lines.append(busy_row(f"cores busy in the scoring phase only ({phase['first_progress_line_s']:.1f}–"
                                  f"{phase['last_progress_line_s']:.1f} s of the process: first to last of "
                                  f"{phase['progress_lines']} progress lines): machine / the job's own CPU share",
                                  phase))
        lines.append(f"| job process wall, excluding nothing (Python, Ray start, scoring, shutdown) | "
                     f"{job['process_wall_s']:.1f} s = {job['process_wall_per_slide_s']:.3f} s/slide | | |")
    start = results.get("start")
    if start:
        job_marks, trivial = start["job"]["marks_s"], start["trivial"]
        lines.append(f"| the job's start in a fresh process (torch and Ray imported first): Ray's start "
                     f"{job_marks['ray_started'] - job_marks['model_loaded']:.2f} s; Ray started → first "
                     f"batch / Ray Data's no-op pipeline through 2 actors | "
                     f"{start['job']['ray_started_to_first_batch_s']} / {trivial['ray_started_to_first_batch_s']} "
                     f"s; then {start['job']['first_to_last_batch_s']} s to the last batch | | |")
    for key, plan in (("job", "fused (default)"), ("job_split", "split")):
        big, small_run = results.get(key), results.get(f"{key}_small")
        if big and small_run and inproc:
            marginal = (big["job_elapsed_s"] - small_run["job_elapsed_s"]) / (big["slides"] - small_run["slides"])
            fixed = small_run["job_elapsed_s"] - small_run["slides"] * marginal
            big |= {"marginal_s_per_slide": round(marginal, 4), "fixed_s": round(fixed, 2)}
            lines.append(f"| stages {plan}: job s/slide, {big['slides']} slides (÷ in-process) = fixed start "
                         f"+ marginal s/slide (÷ in-process); job CPU s/slide | {big['wall_per_slide_s']:.3f} "
                         f"({big['wall_per_slide_s'] / inproc['wall_per_slide_s']:.2f}) = {fixed:.1f} s + "
                         f"{marginal:.3f} ({marginal / inproc['wall_per_slide_s']:.2f}); "
                         f"{big['job_cpu_per_slide_s']:.3f} | before/after | |")
    window = results.get("window")
    if job and window:
        lines.append(f"| slides/hour: cohort job vs `baselines sliding-window`, same {job['slides']} slides | "
                     f"{job['slides_per_hour']:.0f} vs {window['slides_per_hour']:.0f} "
                     f"({job['slides_per_hour'] / window['slides_per_hour']:.1f}×) | side by side | yes |")
    cluster = results.get("cluster")
    if cluster:
        c, o = cluster["check"], cluster["one_node_check"]
        ok = c["lost"] == c["duplicated"] == o["lost"] == o["duplicated"] == 0
        lines.append(f"| 1 node vs 2 nodes ({cluster['nodes_alive']} alive, 4 CPUs each): lost / duplicated rows | "
                     f"{o['lost']} / {o['duplicated']} vs {c['lost']} / {c['duplicated']}; "
                     f"{cluster['slides_scoring_differently_from_1_node']} slides score differently | 0 / 0 | "
                     f"{'yes' if ok else 'no'} |")
    kill = results.get("kill")
    if kill:
        f = kill["final"]
        lines.append(f"| killed at {kill['rows_at_kill']['rows']} slides, re-run (skipped {kill['skipped_on_rerun']}) | "
                     f"exit {kill['second_run']['exit_code']}, {f['rows']} rows, lost {f['lost']}, duplicated "
                     f"{f['duplicated']}, duplicated tiles {f['duplicated_tiles']} | every slide once | "
                     f"{'yes' if kill['every_slide_once'] else 'no'} |")
    small = results.get("job_small")
    if job and small:
        ratio = job["driver_peak_rss_bytes"] / small["driver_peak_rss_bytes"]
        results["driver_rss_ratio"] = round(ratio, 3)
        lines.append(f"| driver peak RSS, {job['slides']} vs {small['slides']} slides | "
                     f"{job['driver_peak_rss_bytes'] / 2**20:.0f} vs {small['driver_peak_rss_bytes'] / 2**20:.0f} MiB "
                     f"({ratio:.2f}×) | ±20% | {'yes' if abs(ratio - 1) <= 0.2 else 'no'} |")
    giga = results.get("giga")
    if giga:
        per_h = giga["gigapixel_slides_per_hour"]
        lines.append(f"| gigapixel slides/hour, paper-her2, {giga['gigapixels']:.2f}-GP slide × "
                     f"{giga['job']['slides']} through the job | **{per_h:.0f}** | ≥ 500 | {'yes' if per_h >= 500 else 'no'} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", default="/tmp/cohort-bench")
    parser.add_argument("--n-slides", type=int, default=200)
    parser.add_argument("--small-n", type=int, default=20)
    parser.add_argument("--slide-px", type=int, default=2048)
    parser.add_argument("--propose-actors", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--giga-px", type=int, default=32768)
    parser.add_argument("--giga-slides", type=int, default=10)
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts of {PARTS}")
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--start-child", nargs=3, help=argparse.SUPPRESS)  # MANIFEST CKPT MODE (part "start")
    args = parser.parse_args()
    if args.start_child:
        print(json.dumps(start_child(*args.start_child)))
        return 0
    only = set(args.only.split(","))
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    results_path = Path(args.results)
    results: dict[str, Any] = json.loads(results_path.read_text()) if results_path.exists() else {}
    results |= {"date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "cores": psutil.cpu_count(),
                "n_slides": args.n_slides, "slide_px": args.slide_px, "load_at_start": load(),
                "command": " ".join(sys.argv)}
    manifest = cohort(work, args.n_slides, args.slide_px)
    small = sub_manifest(manifest, args.small_n, f"manifest-{args.small_n}.parquet")
    ckpt = checkpoint(work, "cpu-small")

    def save() -> None:
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=2, default=str))

    steps = [("inprocess", lambda: part_inprocess(manifest, ckpt)),
             ("job", lambda: part_job(manifest, ckpt, work, args, "job")),
             ("job_small", lambda: part_job(small, ckpt, work, args, "job-small")),
             ("job_split", lambda: part_job(manifest, ckpt, work, args, "job-split", "split")),
             ("job_split_small", lambda: part_job(small, ckpt, work, args, "job-split-small", "split")),
             ("start", lambda: part_start(manifest, ckpt)),
             ("inprocess_after", lambda: part_inprocess(manifest, ckpt)),
             ("window", lambda: part_window(manifest, work)),
             ("cluster", lambda: part_cluster(manifest, ckpt, work, args, work / "out-job")),
             ("kill", lambda: part_kill(manifest, ckpt, work, args)),
             ("giga", lambda: part_giga(work, args))]
    for name, step in steps:
        if name.split("_")[0] not in only:
            continue
        print(f"[{name}] load {load()}", flush=True)
        results[name] = step()
        print(f"[{name}] {json.dumps(results[name], default=str)[:600]}", flush=True)
        save()
    results["load_at_end"] = load()
    results["table"] = table(results)
    save()
    print(results["table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
