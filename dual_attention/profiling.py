"""Where scoring a slide spends its time and memory: one ``StageTimer`` per slide.

The pipeline (``propose_tiles``, ``score_slide``) records its own stages (soft attention, sampling, tile
reads, agent, aggregation); callers that open the slide add theirs (open, thumbnail read, tissue mask)
to the same timer, so the whole profile is built in one place and reported as one dict.
"""

from __future__ import annotations

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
