"""Where scoring a slide spends its time and memory: one ``StageTimer`` per slide.

The pipeline (``propose_tiles``, ``score_slide``) records its own stages (soft attention, sampling, tile
reads, agent, aggregation); callers that open the slide add theirs (open, thumbnail read, tissue mask)
to the same timer, so the whole profile is built in one place and reported as one dict.
"""

from __future__ import annotations

import ctypes
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# The order in which ``as_dict`` lists the stages of a slide score (others follow in recording order).
SCORING_STAGES = ("open", "thumbnail", "tissue_mask", "soft_attention", "sampling", "tile_reads", "agent",
                  "aggregation")


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far (Linux VmHWM; ``ru_maxrss`` elsewhere). A process-wide
    high-water mark: in a long-lived process (a server) it covers every earlier request too."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # kB on Linux


# glibc's mallopt parameters (malloc.h) and the values scoring processes set (see ``one_malloc_arena``)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
SCORING_MALLOC = ((M_ARENA_MAX, 1), (M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, 64 << 20))


def one_malloc_arena() -> bool:
    """Make this process's threads share one glibc malloc arena, for the processes that score slides; called
    as they start (the ``score`` command, the cohort job's actors, the serving replicas), before worker threads
    allocate. glibc gives each allocating thread an arena of its own and keeps what is freed there for that
    arena: after a 3.2-GP slide the SAM's two tile threads held 79 MB in their arenas with 0.8 MB in use, and
    the main arena 70 MB free (``malloc_stats``), so peak RSS grew with the slide beyond its live arrays. One
    arena alone made the SAM's tiles 15-30% slower (its top trimmed and re-faulted as tiles come and go), so the
    thresholds are fixed too: blocks from 32 MiB (glibc's largest dynamic threshold) are mapped apart, and the
    heap keeps up to 64 MiB free at its top. Measured warm, 3.2 GP ÷ 100 MP peak RSS, cpu-small / paper-her2:
    1.23 / 1.15 with glibc's defaults, 1.14 / 1.09 with these, SAM time unchanged (benchmarks/RESULTS.md,
    "Slide cost"). Returns False where the C library is not glibc."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(parameter, value) == 1 for parameter, value in SCORING_MALLOC)


class StageTimer:
    """Wall-clock milliseconds per named stage; a stage entered several times accumulates."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.ms[name] = self.ms.get(name, 0.0) + (time.perf_counter() - started) * 1000.0

    def as_dict(self) -> dict[str, object]:
        """``{"stages_ms": {...}, "total_ms": ..., "peak_rss_bytes": ...}``, JSON-ready."""
        names = [s for s in SCORING_STAGES if s in self.ms] + [s for s in self.ms if s not in SCORING_STAGES]
        return {
            "stages_ms": {name: round(self.ms[name], 3) for name in names},
            "total_ms": round(sum(self.ms.values()), 3),
            "peak_rss_bytes": peak_rss_bytes(),
        }
