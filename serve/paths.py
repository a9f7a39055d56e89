"""Slide names from requests -> files under the configured slide root, refusing anything that leaves it.

A request names a slide by a path relative to the root. Refused with ``PathOutsideRoot`` (HTTP 403):
absolute paths, any ``..`` component, NUL bytes, and paths that resolve (through symlinks) outside the
root. The refusal is decided before the file system is asked whether the file exists, so a 403 says
nothing about files outside the root.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath, PureWindowsPath


class PathOutsideRoot(ValueError):
    """The requested slide path would leave the slide root (HTTP 403)."""


class SlideNotFound(LookupError):
    """No slide file of that name under the slide root (HTTP 404)."""


def resolve_slide_path(slide_root: str | Path, relative: str) -> Path:
    """The real path of ``relative`` under ``slide_root``; raises ``PathOutsideRoot`` or ``SlideNotFound``."""
    root = Path(os.path.realpath(slide_root))
    if not relative or not relative.strip():
        raise SlideNotFound("empty slide path")
    if "\x00" in relative:
        raise PathOutsideRoot(f"slide path {relative!r} contains a NUL byte")
    # Both separators count: a Windows-style '..\\x' must not slip through on any platform.
    if PurePosixPath(relative).is_absolute() or PureWindowsPath(relative).is_absolute() or relative.startswith("\\"):
        raise PathOutsideRoot(f"slide path {relative!r} is absolute; name it relative to the slide root")
    parts = relative.replace("\\", "/").split("/")
    if ".." in parts:
        raise PathOutsideRoot(f"slide path {relative!r} contains '..'")
    real = Path(os.path.realpath(root / relative))
    if real != root and root not in real.parents:
        raise PathOutsideRoot(f"slide path {relative!r} resolves outside the slide root (symlink)")
    if not real.exists():
        raise SlideNotFound(f"no slide {relative!r} under the slide root")
    if not real.is_file():
        raise SlideNotFound(f"slide path {relative!r} is not a file")
    return real
