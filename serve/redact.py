"""Server-side paths out of answers: messages name slides relative to the slide root, uploads by the
client's file name and models by name and version; the full paths go only to the server's log.

``redact_paths`` first rewrites the paths the caller knows (slide root, upload folder, model download
folder) to what the client may see, then, as a fallback for paths inside library messages (OpenSlide,
torch, MLflow), replaces any remaining absolute path by its last component.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

# An absolute POSIX path of two or more components, not part of a URI (``models:/a/b``, ``http://h/x``).
_ABSOLUTE_PATH = re.compile(r"(?<![\w:/.~-])/(?:[^\s/'\"`:,;()\[\]{}<>]+/)+([^\s/'\"`:,;()\[\]{}<>]*)")


def redact_paths(text: str, known: Mapping[str | os.PathLike[str], str] | None = None) -> str:
    """``text`` with each key of ``known`` (a folder or file path) replaced by its value (``""`` makes
    paths under that folder relative to it), longest first; then any other absolute path by its name."""
    for path, public in sorted(((os.fspath(p), v) for p, v in (known or {}).items() if os.fspath(p)),
                               key=lambda item: -len(item[0])):
        folder = path.rstrip("/")
        if public == "":
            text = text.replace(folder + "/", "")
        text = text.replace(folder, public or ".")
    return _ABSOLUTE_PATH.sub(lambda match: match.group(1) or "<server path>", text)
