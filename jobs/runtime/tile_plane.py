"""The Ray tile plane: a pool of tile-reader actors that read level-0 boxes from slides in parallel.

Training, evaluation and serving all read tiles through ``TilePool``:

- A request is a ``TileRequest`` (slide, level-0 box, optional output size or magnification). The pool cuts
  a list of requests into batches; a batch goes to one reader actor (the least loaded), which answers with
  one list of uint8 arrays, so the object store sees one object per batch, not one per tile.
- A bad slide does not fail its batch: the actor puts the ``SlideError`` (naming the file) in place of that
  request's pixels, and ``read`` hands it back in request order. ``read_tiles_fn`` raises it instead.
- Backpressure: at most ``max_in_flight`` batches are outstanding in the whole pool (a semaphore shared by
  every caller), so a fast consumer cannot fill memory; ``iter_read`` streams results in request order.
- Faults: actors are created with ``max_restarts``/``max_task_retries``, so Ray restarts a killed actor and
  re-runs its in-flight batches; if Ray gives up (restarts spent, actor gone), the pool resubmits the batch
  to another actor and replaces the dead one.
- Pixel accounting: every successful read adds the area of its level-0 box to a per-slide counter kept on
  the driver (``pixels_read_level0``). Overlapping boxes count every time they are read.

Tiles are never written to disk: they live in the actors, the object store and the caller's memory only.
"""

from __future__ import annotations

import math
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray.exceptions import ActorDiedError, RayActorError

from dual_attention.slides import Level0Box, SlideError, SlideHandleCache

ReadTiles = Callable[[Sequence[Level0Box]], np.ndarray]  # same contract as dual_attention.pipeline.ReadTiles

DEFAULT_BATCH_SIZE = 64  # requests per actor call: amortises Ray's per-call overhead (benchmarks/RESULTS.md)
DEFAULT_MAX_BATCH_BYTES = 64 * 2**20  # also cut batches by output size: ten 2048² tiles are 120 MiB
DEFAULT_ACTOR_NUM_CPUS = 0.5  # logical CPUs per reader; reads are I/O + JPEG decode, one core at most


@dataclass(frozen=True)
class TileRequest:
    """Read ``level0_box`` of ``slide_path``: at level 0 (default), resized to ``out_px=(width, height)``,
    or rendered at ``magnification`` (e.g. 20 from a 40x slide). At most one of the two may be given."""

    slide_path: str
    level0_box: Level0Box
    out_px: tuple[int, int] | None = None
    magnification: float | None = None

    def __post_init__(self) -> None:
        if self.out_px is not None and self.magnification is not None:
            raise ValueError(f"TileRequest for {self.slide_path}: give out_px or magnification, not both")

    def estimated_nbytes(self) -> int:
        """Upper bound of the answer's size (a magnification read is never larger than level 0)."""
        if self.out_px is not None:
            return 3 * self.out_px[0] * self.out_px[1]
        return 3 * self.level0_box.area_level0_px


class TilePoolError(RuntimeError):
    """The pool itself failed (actors kept dying past the retry budget, or the pool was shut down)."""


def read_request(slides: SlideHandleCache, request: TileRequest) -> np.ndarray:
    """One read through an open-handle cache: the code both the actors and local readers run."""
    slide = slides.get(request.slide_path)
    if request.magnification is not None:
        return slide.read_box_at_magnification(request.level0_box, request.magnification)
    return slide.read_box(request.level0_box, request.out_px)


class TileReader:
    """Reads batches of tile requests through a bounded cache of open slides.

    A plain class so it can be used without Ray; ``TilePool`` runs it as a Ray actor.
    """

    def __init__(self, max_open_slides: int = 8) -> None:
        self._slides = SlideHandleCache(max_open_slides)

    def read_batch(self, requests: Sequence[TileRequest]) -> list[np.ndarray | SlideError]:
        """Pixels per request, in order; a failed request yields its ``SlideError`` in place (not raised),
        so one bad slide does not fail the other requests of the batch."""
        results: list[np.ndarray | SlideError] = []
        for request in requests:
            try:
                results.append(read_request(self._slides, request))
            except SlideError as exc:
                self._slides.evict(request.slide_path)  # a failed read may leave the handle unusable
                results.append(exc)
            except Exception as exc:  # noqa: BLE001 - any other failure is still this request's alone
                self._slides.evict(request.slide_path)
                results.append(SlideError(request.slide_path, f"unexpected {type(exc).__name__}: {exc}"))
        return results

    def where(self) -> dict[str, Any]:
        """Node and process of this reader (tests check SPREAD placement with it)."""
        context = ray.get_runtime_context() if ray.is_initialized() else None
        return {"node_id": context.get_node_id() if context else None, "pid": os.getpid()}

    def open_slides(self) -> int:
        return len(self._slides)


@dataclass
class _Batch:
    """A slice of one caller's requests, and where it is being read."""

    requests: list[TileRequest]
    actor_slot: int = -1
    actor: Any = None
    ref: ray.ObjectRef | None = None
    attempts: int = 0
    done: bool = field(default=False)


class TilePool:
    """A pool of ``num_actors`` tile-reader actors (see the module docstring).

    Needs a running Ray (``ray.init`` first, or inside a Ray job, Train worker or Serve replica).
    Thread-safe: several threads may call ``read`` at once; they share the in-flight budget.
    """

    def __init__(
        self,
        num_actors: int = 2,
        max_in_flight: int | None = None,
        max_open_slides: int = 8,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        actor_num_cpus: float = DEFAULT_ACTOR_NUM_CPUS,
        max_restarts: int = 3,
        max_task_retries: int = 3,
        max_batch_retries: int = 3,
        scheduling_strategy: str | Any = "SPREAD",
        start_timeout_s: float = 120.0,
    ) -> None:
        if num_actors < 1:
            raise ValueError(f"num_actors must be >= 1, got {num_actors}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_batch_bytes < 1:
            raise ValueError(f"max_batch_bytes must be >= 1, got {max_batch_bytes}")
        max_in_flight = 2 * num_actors if max_in_flight is None else max_in_flight
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        if not ray.is_initialized():
            raise TilePoolError("TilePool needs a running Ray: call ray.init() first")
        self.num_actors = num_actors
        self.max_in_flight = max_in_flight
        self.batch_size = batch_size
        self.max_batch_bytes = max_batch_bytes
        self.max_batch_retries = max_batch_retries
        self._actor_class = ray.remote(TileReader).options(
            num_cpus=actor_num_cpus,
            max_restarts=max_restarts,
            max_task_retries=max_task_retries,
            scheduling_strategy=scheduling_strategy,
        )
        self._max_open_slides = max_open_slides
        self._lock = threading.Lock()
        self._in_flight = threading.BoundedSemaphore(max_in_flight)
        self._n_in_flight = 0
        self._actors = [self._actor_class.remote(max_open_slides) for _ in range(num_actors)]
        self._actor_load = [0] * num_actors  # outstanding batches per actor
        self._next_slot = 0  # round-robin among equally loaded actors
        self._pixels_level0: dict[str, int] = {}
        self._closed = False
        try:  # fail now, with the reason, if the cluster cannot place the actors
            ray.get([actor.where.remote() for actor in self._actors], timeout=start_timeout_s)
        except ray.exceptions.GetTimeoutError:
            self.shutdown()
            raise TilePoolError(
                f"{num_actors} tile-reader actors ({actor_num_cpus} CPU each) did not start within "
                f"{start_timeout_s:g} s; free cluster resources: {ray.available_resources()}"
            ) from None

    # -- reading ------------------------------------------------------------------------------------------
    def read(self, requests: Sequence[TileRequest]) -> list[np.ndarray | SlideError]:
        """Pixels for every request, in request order; a failed request gives its ``SlideError`` in place."""
        return list(self.iter_read(requests))

    def iter_read(self, requests: Sequence[TileRequest]) -> Iterator[np.ndarray | SlideError]:
        """Stream results in request order with at most ``max_in_flight`` batches outstanding."""
        return self._stream(requests, copy=True)

    def _stream(self, requests: Sequence[TileRequest], copy: bool) -> Iterator[np.ndarray | SlideError]:
        """``copy=False`` yields read-only views into the object store (each keeps its batch there while it lives)."""
        self._check_open()
        # Batches leave `unsent` when submitted and `pending` when collected, so nothing keeps the ObjectRef
        # (and thus the pixels in the object store) of a batch already handed to the caller.
        unsent = deque(self._split(list(requests)))
        pending: deque[_Batch] = deque()
        try:
            while unsent or pending:
                # Submit while the pool has budget; block for budget only when we have nothing to collect.
                while unsent and self._acquire_slot(blocking=not pending):
                    batch = unsent.popleft()
                    try:
                        self._submit(batch)
                    except BaseException:
                        self._release_slot()
                        raise
                    pending.append(batch)
                batch = pending.popleft()
                try:
                    results = self._collect(batch)
                finally:
                    self._release_slot()
                for request, result in zip(batch.requests, results, strict=True):
                    if isinstance(result, np.ndarray):
                        self._count_pixels(request)
                        # a copy is owned and writable, and lets the batch's object be freed
                        yield np.array(result) if copy else result
                    else:
                        yield result
                del results  # drop the zero-copy views before waiting for the next batch
        finally:
            # An abandoned stream (caller stopped early, or an error) gives its budget back.
            for batch in pending:
                self._finish(batch)
                self._release_slot()

    def read_tiles_fn(self, slide_path: str | Path, tile_level0_px: int) -> ReadTiles:
        """A plain callable ``(boxes) -> (n, S, S, 3) uint8`` reading square level-0 tiles of one slide
        (S = ``tile_level0_px``) through the pool; it raises the ``SlideError`` of the first failed box."""
        path = str(slide_path)

        def read_tiles(boxes: Sequence[Level0Box]) -> np.ndarray:
            for box in boxes:
                if (box.width, box.height) != (tile_level0_px, tile_level0_px):
                    raise ValueError(
                        f"{path}: tile box {box.as_tuple()} is not {tile_level0_px}x{tile_level0_px} level-0 px"
                    )
            tiles = np.empty((len(boxes), tile_level0_px, tile_level0_px, 3), dtype=np.uint8)
            for i, result in enumerate(self._stream([TileRequest(path, box) for box in boxes], copy=False)):
                if isinstance(result, SlideError):
                    raise result
                tiles[i] = result
            return tiles

        return read_tiles

    def in_flight_batches(self) -> int:
        """Batches submitted and not yet handed to their caller, over the whole pool."""
        with self._lock:
            return self._n_in_flight

    # -- pixel accounting ---------------------------------------------------------------------------------
    def pixels_read_level0(self, slide_path: str | Path | None = None) -> int:
        """Level-0 pixels read so far: for one slide, or for all slides together."""
        with self._lock:
            if slide_path is None:
                return sum(self._pixels_level0.values())
            return self._pixels_level0.get(_slide_key(slide_path), 0)

    def fraction_read_level0(self, slide_path: str | Path, level0_dims: tuple[int, int]) -> float:
        """Level-0 pixels read from the slide over its level-0 area (overlapping reads count each time)."""
        width, height = level0_dims
        return self.pixels_read_level0(slide_path) / float(width * height)

    def pixels_read_by_slide(self) -> dict[str, int]:
        """A copy of the per-slide totals, keyed by absolute slide path."""
        with self._lock:
            return dict(self._pixels_level0)

    def reset_pixel_counts(self, slide_path: str | Path | None = None) -> None:
        with self._lock:
            if slide_path is None:
                self._pixels_level0.clear()
            else:
                self._pixels_level0.pop(_slide_key(slide_path), None)

    # -- actors -------------------------------------------------------------------------------------------
    @property
    def actors(self) -> list[Any]:
        """The reader actors' handles (current ones; a replaced actor drops out)."""
        with self._lock:
            return list(self._actors)

    def actor_locations(self) -> list[dict[str, Any]]:
        """``{"node_id", "pid"}`` of every reader actor."""
        return ray.get([actor.where.remote() for actor in self.actors])

    def shutdown(self) -> None:
        """Kill the reader actors; the pool cannot be used afterwards. Safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            actors, self._actors = self._actors, []
        for actor in actors:
            ray.kill(actor, no_restart=True)

    def __enter__(self) -> TilePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # -- internals ----------------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise TilePoolError("the TilePool has been shut down")

    def _acquire_slot(self, blocking: bool) -> bool:
        if not self._in_flight.acquire(blocking=blocking):
            return False
        with self._lock:
            self._n_in_flight += 1
        return True

    def _release_slot(self) -> None:
        with self._lock:
            self._n_in_flight -= 1
        self._in_flight.release()

    def _split(self, requests: list[TileRequest]) -> list[_Batch]:
        """Cut requests into batches of at most ``batch_size`` requests and ``max_batch_bytes`` output, and
        into at least one batch per actor when there are enough requests, so a small call uses every actor."""
        requests = [_absolute(request) for request in requests]
        if not requests:
            return []
        n_batches = max(math.ceil(len(requests) / self.batch_size), min(self.num_actors, len(requests)))
        per_batch = math.ceil(len(requests) / n_batches)
        batches: list[_Batch] = []
        current: list[TileRequest] = []
        current_bytes = 0
        for request in requests:
            nbytes = request.estimated_nbytes()
            if current and (len(current) >= per_batch or current_bytes + nbytes > self.max_batch_bytes):
                batches.append(_Batch(current))
                current, current_bytes = [], 0
            current.append(request)
            current_bytes += nbytes
        batches.append(_Batch(current))
        return batches

    def _submit(self, batch: _Batch, avoid_slot: int | None = None) -> None:
        with self._lock:
            if self._closed:
                raise TilePoolError("the TilePool has been shut down")
            slots = [s for s in range(len(self._actors)) if s != avoid_slot] or list(range(len(self._actors)))
            # least loaded; ties go round-robin from the last slot used
            start = self._next_slot
            slot = min(slots, key=lambda s: (self._actor_load[s], (s - start) % len(self._actors)))
            self._next_slot = (slot + 1) % len(self._actors)
            self._actor_load[slot] += 1
            actor = self._actors[slot]
        batch.actor_slot, batch.actor, batch.done = slot, actor, False
        batch.ref = actor.read_batch.remote(batch.requests)

    def _finish(self, batch: _Batch) -> None:
        with self._lock:
            if not batch.done and 0 <= batch.actor_slot < len(self._actor_load):
                self._actor_load[batch.actor_slot] -= 1
            batch.done = True

    def _collect(self, batch: _Batch) -> list[np.ndarray | SlideError]:
        """The batch's results; on actor failure past Ray's own retries, resubmit to another actor."""
        while True:
            try:
                results = ray.get(batch.ref)
            except RayActorError as exc:
                self._finish(batch)
                batch.attempts += 1
                if batch.attempts > self.max_batch_retries:
                    raise TilePoolError(
                        f"tile batch of {len(batch.requests)} requests failed {batch.attempts} times "
                        f"(first slide {batch.requests[0].slide_path}): {exc}"
                    ) from exc
                if isinstance(exc, ActorDiedError):
                    self._replace_actor(batch.actor_slot, batch.actor)
                self._submit(batch, avoid_slot=batch.actor_slot)
                continue
            self._finish(batch)
            batch.ref = None  # the caller holds the results now; let the object store free them
            return results

    def _replace_actor(self, slot: int, dead_actor: Any) -> None:
        """Put a fresh actor in a slot whose actor Ray will not restart any more (once per dead actor)."""
        with self._lock:
            if self._closed or self._actors[slot] is not dead_actor:
                return
            # Batches still counted on the dead actor fail fast and uncount themselves in _finish.
            self._actors[slot] = self._actor_class.remote(self._max_open_slides)
        ray.kill(dead_actor, no_restart=True)

    def _count_pixels(self, request: TileRequest) -> None:
        with self._lock:
            key = request.slide_path
            self._pixels_level0[key] = self._pixels_level0.get(key, 0) + request.level0_box.area_level0_px


def _slide_key(slide_path: str | Path) -> str:
    return os.path.abspath(str(slide_path))


def _absolute(request: TileRequest) -> TileRequest:
    """Actors may run in another working directory (or node): send absolute paths."""
    key = _slide_key(request.slide_path)
    if key == request.slide_path:
        return request
    return TileRequest(key, request.level0_box, request.out_px, request.magnification)
