"""The Ray tile plane: pixels equal direct reads, bad slides fail alone, killed actors lose nothing,
backpressure holds, accounting adds up, actors spread over two nodes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import ray

from dual_attention.slides import Level0Box, SlideError, open_slide
from dual_attention.synthetic import write_synthetic_slide
from jobs.runtime.tile_plane import TilePool, TilePoolError, TileReader, TileRequest

PROJECT_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A synthetic 40x (0.25 mpp) slide, 2048 x 1536 at level 0, levels at downsample 1, 2, 4."""
    path = tmp_path_factory.mktemp("tile_plane") / "slide.tiff"
    write_synthetic_slide(path, "her2", label=2, seed=7, width_level0_px=2048, height_level0_px=1536)
    return str(path)


@pytest.fixture(scope="module")
def pool(ray_cluster: None) -> TilePool:
    tile_pool = TilePool(num_actors=2, max_in_flight=4, batch_size=4, actor_num_cpus=0.25)
    yield tile_pool
    tile_pool.shutdown()


def _direct(request: TileRequest) -> np.ndarray:
    with open_slide(request.slide_path) as slide:
        if request.magnification is not None:
            return slide.read_box_at_magnification(request.level0_box, request.magnification)
        return slide.read_box(request.level0_box, request.out_px)


def _grid_requests(slide_path: str, n: int, side: int = 256) -> list[TileRequest]:
    rng = np.random.default_rng(0)
    xs = rng.integers(0, 2048 - side, size=n)
    ys = rng.integers(0, 1536 - side, size=n)
    return [TileRequest(slide_path, Level0Box(int(x), int(y), side, side)) for x, y in zip(xs, ys, strict=True)]


def test_pool_pixels_equal_direct_reads(pool: TilePool, slide_path: str) -> None:
    assert open_slide(slide_path).info.objective_power == 40.0
    requests = [
        *_grid_requests(slide_path, 9),
        TileRequest(slide_path, Level0Box(300, 200, 1024, 768), magnification=20.0),  # 20x from the 40x slide
        TileRequest(slide_path, Level0Box(1, 3, 1000, 500), magnification=20.0),  # odd box, no exact level
        TileRequest(slide_path, Level0Box(0, 0, 2048, 1536), out_px=(200, 150)),
    ]
    results = pool.read(requests)
    assert len(results) == len(requests)
    for request, result in zip(requests, results, strict=True):
        assert isinstance(result, np.ndarray), result
        assert result.dtype == np.uint8 and result.flags.writeable
        np.testing.assert_array_equal(result, _direct(request))
    assert results[9].shape == (384, 512, 3)  # half of a 1024 x 768 box
    assert results[-1].shape == (150, 200, 3)


def test_broken_slides_fail_only_their_own_request(pool: TilePool, slide_path: str, shared_slides: Path) -> None:
    broken = [
        shared_slides / "broken" / "unreadable.svs",  # opens, reads fail
        shared_slides / "broken" / "unopenable.tiff",  # unsupported compression
        shared_slides / "broken" / "histolab-broken.svs",  # not a slide at all
    ]
    good = _grid_requests(slide_path, 3)
    requests = [good[0], *(TileRequest(str(p), Level0Box(0, 0, 16, 16)) for p in broken), good[1]]
    results = pool.read(requests)
    np.testing.assert_array_equal(results[0], _direct(good[0]))
    np.testing.assert_array_equal(results[-1], _direct(good[1]))
    for path, error in zip(broken, results[1:-1], strict=True):
        assert isinstance(error, SlideError)
        assert error.path == str(path) and error.reason
        assert path.name in str(error)
    # the pool keeps serving: the next request succeeds
    (after,) = pool.read([good[2]])
    np.testing.assert_array_equal(after, _direct(good[2]))


def test_read_tiles_fn_stacks_tiles_and_raises_the_slide_error(
    pool: TilePool, slide_path: str, shared_slides: Path
) -> None:
    read_tiles = pool.read_tiles_fn(slide_path, 256)
    boxes = [r.level0_box for r in _grid_requests(slide_path, 5)]
    tiles = read_tiles(boxes)
    assert tiles.shape == (5, 256, 256, 3) and tiles.dtype == np.uint8
    for box, tile in zip(boxes, tiles, strict=True):
        np.testing.assert_array_equal(tile, _direct(TileRequest(slide_path, box)))
    assert read_tiles([]).shape == (0, 256, 256, 3)
    with pytest.raises(ValueError, match="not 256x256"):
        read_tiles([Level0Box(0, 0, 256, 128)])
    bad_path = shared_slides / "broken" / "unreadable.svs"
    with pytest.raises(SlideError) as raised:
        pool.read_tiles_fn(bad_path, 16)([Level0Box(0, 0, 16, 16)])
    assert raised.value.path == str(bad_path)


def test_pixel_accounting_counts_level0_box_areas_per_slide(
    pool: TilePool, slide_path: str, shared_slides: Path
) -> None:
    pool.reset_pixel_counts()
    other = str(shared_slides / "aperio" / "CMU-1-Small-Region.svs")
    requests = [
        TileRequest(slide_path, Level0Box(0, 0, 256, 256)),
        TileRequest(slide_path, Level0Box(10, 10, 1024, 512), magnification=20.0),  # counts at level 0
        TileRequest(other, Level0Box(100, 100, 300, 200)),
        TileRequest(str(shared_slides / "broken" / "unreadable.svs"), Level0Box(0, 0, 16, 16)),  # fails: 0
    ]
    pool.read(requests)
    assert pool.pixels_read_level0(slide_path) == 256 * 256 + 1024 * 512
    assert pool.pixels_read_level0(other) == 300 * 200
    assert pool.pixels_read_level0(shared_slides / "broken" / "unreadable.svs") == 0
    assert pool.pixels_read_level0() == 256 * 256 + 1024 * 512 + 300 * 200
    assert pool.fraction_read_level0(slide_path, (2048, 1536)) == (256 * 256 + 1024 * 512) / (2048 * 1536)
    assert pool.pixels_read_by_slide() == {slide_path: 256 * 256 + 1024 * 512, other: 300 * 200}
    # relative and absolute spellings of a path are one slide
    relative = os.path.relpath(slide_path)
    pool.read([TileRequest(relative, Level0Box(0, 0, 100, 100))])
    assert pool.pixels_read_level0(slide_path) == 256 * 256 + 1024 * 512 + 100 * 100


def test_backpressure_bounds_batches_in_flight(ray_cluster: None, slide_path: str) -> None:
    with TilePool(num_actors=2, max_in_flight=2, batch_size=1, actor_num_cpus=0.25) as small_pool:
        requests = _grid_requests(slide_path, 12)
        stream = small_pool.iter_read(requests)
        seen_in_flight = []
        for i, tile in enumerate(stream):
            seen_in_flight.append(small_pool.in_flight_batches())
            time.sleep(0.01)  # a slow consumer: the readers must wait for it, not run ahead
            np.testing.assert_array_equal(tile, _direct(requests[i]))
            if i == 5:
                break
        stream.close()  # an abandoned stream gives its budget back
        assert max(seen_in_flight) <= 2
        assert small_pool.in_flight_batches() == 0
        assert len(small_pool.read(requests)) == 12  # the full budget is usable again


def _objects_in_store() -> int:
    from ray._private.internal_api import memory_summary  # no public API counts plasma objects

    summary = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
    return int(re.search(r"(\d+) objects", summary).group(1))


def test_streamed_tiles_leave_the_object_store(ray_cluster: None, slide_path: str) -> None:
    """Memory stays bounded over a long stream: a batch handed to the caller is freed in the store."""
    with TilePool(num_actors=2, max_in_flight=2, batch_size=1, actor_num_cpus=0.25) as stream_pool:
        requests = _grid_requests(slide_path, 40)
        baseline = _objects_in_store()
        for i, tile in enumerate(stream_pool.iter_read(requests)):
            np.testing.assert_array_equal(tile, _direct(requests[i]))
            if i == 30:
                # The stream is paused here. Frees reach the store asynchronously (slowly on a busy machine):
                # wait for them; a leak (every delivered batch still referenced) would keep ~30 objects.
                deadline = time.monotonic() + 20
                while (extra := _objects_in_store() - baseline) > 2 + 1 and time.monotonic() < deadline:
                    time.sleep(0.2)
                assert extra <= 2 + 1  # the batches in flight + the one being consumed


def test_concurrent_callers_share_the_pool(pool: TilePool, slide_path: str) -> None:
    """Serving reads from several threads at once; each caller gets its own tiles, in its own order."""
    from concurrent.futures import ThreadPoolExecutor

    request_lists = [_grid_requests(slide_path, 10)[i::3] for i in range(3)]
    with ThreadPoolExecutor(max_workers=3) as executor:
        outputs = list(executor.map(pool.read, request_lists))
    for requests, results in zip(request_lists, outputs, strict=True):
        for request, result in zip(requests, results, strict=True):
            np.testing.assert_array_equal(result, _direct(request))
    assert pool.in_flight_batches() == 0


def test_unplaceable_pool_fails_with_the_reason(ray_cluster: None) -> None:
    with pytest.raises(TilePoolError, match="did not start within"):
        TilePool(num_actors=1, actor_num_cpus=1000, start_timeout_s=1)


def test_killed_actor_loses_no_requests(ray_cluster: None, slide_path: str) -> None:
    requests = _grid_requests(slide_path, 60)
    with TilePool(num_actors=2, max_in_flight=4, batch_size=3, actor_num_cpus=0.25) as kill_pool:
        pids_before = [location["pid"] for location in kill_pool.actor_locations()]
        stream = kill_pool.iter_read(requests)
        results = [next(stream)]  # batches are now in flight on both actors
        assert kill_pool.in_flight_batches() > 1
        ray.kill(kill_pool.actors[0], no_restart=False)  # Ray restarts it and retries its batches
        results.extend(stream)
        assert len(results) == len(requests)
        for request, result in zip(requests, results, strict=True):
            np.testing.assert_array_equal(result, _direct(request))
        pids_after = [location["pid"] for location in kill_pool.actor_locations()]
        assert pids_after[0] != pids_before[0] and pids_after[1] == pids_before[1]  # it really was restarted
        # an actor that is gone for good: the pool resubmits its batches elsewhere and replaces it
        stream = kill_pool.iter_read(requests)
        results = [next(stream)]
        dead = kill_pool.actors[1]
        ray.kill(dead, no_restart=True)
        results.extend(stream)
        for request, result in zip(requests, results, strict=True):
            np.testing.assert_array_equal(result, _direct(request))
        assert dead not in kill_pool.actors and len(kill_pool.actors) == 2
        assert len(kill_pool.read(requests[:4])) == 4


def test_tile_reader_runs_without_ray(slide_path: str, shared_slides: Path) -> None:
    reader = TileReader(max_open_slides=1)
    good = _grid_requests(slide_path, 2)
    bad = TileRequest(str(shared_slides / "broken" / "histolab-broken.svs"), Level0Box(0, 0, 8, 8))
    results = reader.read_batch([good[0], bad, good[1]])
    np.testing.assert_array_equal(results[0], _direct(good[0]))
    assert isinstance(results[1], SlideError)
    np.testing.assert_array_equal(results[2], _direct(good[1]))
    assert reader.open_slides() == 1


_TWO_NODE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import ray
    from ray.cluster_utils import Cluster
    from dual_attention.slides import Level0Box, open_slide
    from jobs.runtime.tile_plane import TilePool, TileRequest

    slide_path = sys.argv[1]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        pool = TilePool(num_actors=2, actor_num_cpus=0.25, batch_size=2)
        requests = [TileRequest(slide_path, Level0Box(128 * i, 96 * i, 256, 256)) for i in range(8)]
        results = pool.read(requests)
        with open_slide(slide_path) as slide:
            same = all(np.array_equal(r, slide.read_box(q.level0_box)) for q, r in zip(requests, results))
        nodes = [location["node_id"] for location in pool.actor_locations()]
        cluster_nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
        pool.shutdown()
        print("RESULT " + json.dumps({"same": same, "actor_nodes": nodes, "cluster_nodes": cluster_nodes}))
    finally:
        ray.shutdown()
        cluster.shutdown()
    """
)


@pytest.mark.slow
def test_two_node_cluster_spreads_actors_and_reads_the_same(slide_path: str) -> None:
    """Runs in a subprocess: a second local cluster cannot live in the session's Ray driver."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(PROJECT_ROOT)}
    completed = subprocess.run(
        [sys.executable, "-c", _TWO_NODE_SCRIPT, slide_path],
        capture_output=True, text=True, timeout=240, env=env, cwd=PROJECT_ROOT,
    )
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    assert completed.returncode == 0 and lines, completed.stderr[-3000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    assert len(result["cluster_nodes"]) == 2
    assert sorted(result["actor_nodes"]) == result["cluster_nodes"]  # one actor on each node
    assert result["same"]
