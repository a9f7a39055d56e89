"""Overlay PNGs on disk, keyed by score id, so that any ingress replica can answer ``/v1/overlay/{id}``.

The PNG is rendered when the score is made (the client asked for it with ``overlay=true``) and written
atomically (temporary file, then rename), so a reader on another replica sees a whole file or none. The
store keeps the ``capacity`` most recent PNGs and removes older ones after each write. Only PNG bytes are
stored: nothing read back is unpickled or executed. Score ids are checked against the form this service
makes (32 hex digits) before they touch the file system.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

_SCORE_ID = re.compile(r"^[0-9a-f]{32}$")  # uuid4().hex
_SUFFIX = ".png"


class OverlayStore:
    def __init__(self, folder: str | Path, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"overlay capacity must be >= 1, got {capacity}")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.capacity = capacity

    def _path(self, score_id: str) -> Path | None:
        return self.folder / f"{score_id}{_SUFFIX}" if _SCORE_ID.match(score_id) else None

    def put(self, score_id: str, png: bytes) -> None:
        path = self._path(score_id)
        if path is None:
            raise ValueError(f"score id {score_id!r} is not 32 hex digits")
        handle, tmp = tempfile.mkstemp(dir=self.folder, prefix=f".{score_id}-", suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as file:
                file.write(png)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._evict()

    def get(self, score_id: str) -> bytes | None:
        path = self._path(score_id)
        if path is None:
            return None
        try:
            return path.read_bytes()
        except FileNotFoundError:  # unknown, or evicted (possibly by another replica just now)
            return None

    def __len__(self) -> int:
        return sum(1 for _ in self.folder.glob(f"*{_SUFFIX}"))

    def _evict(self) -> None:
        entries = []
        for path in self.folder.glob(f"*{_SUFFIX}"):
            try:
                entries.append((path.stat().st_mtime_ns, path))
            except FileNotFoundError:  # another replica evicted it meanwhile
                continue
        entries.sort()
        for _, path in entries[:max(0, len(entries) - self.capacity)]:
            path.unlink(missing_ok=True)
