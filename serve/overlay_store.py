"""Overlay PNGs (and GeoJSON annotations) on disk, keyed by score id, so that any ingress replica can
answer ``/v1/overlay/{id}`` and ``/v1/score/{id}/geojson``; one store per file suffix.

The PNG is rendered when the score is made (the client asked for it with ``overlay=true``) and written
atomically (temporary file, then rename), so a reader on another replica sees a whole file or none. The
store keeps the ``capacity`` most recent files of its suffix and removes older ones after each write. Only
the bytes are stored: nothing read back is unpickled or executed. Score ids are checked against the form this service
makes (32 hex digits) before they touch the file system.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

_SCORE_ID = re.compile(r"^[0-9a-f]{32}$")  # uuid4().hex


class OverlayStore:
    def __init__(self, folder: str | Path, capacity: int, suffix: str = ".png") -> None:
        if capacity < 1:
            raise ValueError(f"overlay capacity must be >= 1, got {capacity}")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.capacity = capacity
        self.suffix = suffix  # one kind of file per store; stores of other suffixes may share the folder

    def _path(self, score_id: str) -> Path | None:
        return self.folder / f"{score_id}{self.suffix}" if _SCORE_ID.match(score_id) else None

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
        return sum(1 for _ in self.folder.glob(f"*{self.suffix}"))

    def _evict(self) -> None:
        entries = []
        for path in self.folder.glob(f"*{self.suffix}"):
            try:
                entries.append((path.stat().st_mtime_ns, path))
            except FileNotFoundError:  # another replica evicted it meanwhile
                continue
        entries.sort()
        for _, path in entries[:max(0, len(entries) - self.capacity)]:
            path.unlink(missing_ok=True)
