"""Slide uploads: a multipart body streamed straight to a temporary file, within a size limit.

Starlette's ``request.form()`` would spool the whole body before the handler sees it, so the size limit
could only be checked after the fact. Here python-multipart's streaming parser feeds the ``file`` part to
disk chunk by chunk and stops at the limit (HTTP 413). Each upload gets its own temporary folder (a DICOM
slide is opened with the files of its folder), and the folder is removed when the ``slide_upload``
context ends, whatever happened.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

UPLOAD_FIELD = "file"
_MULTIPART_OVERHEAD_BYTES = 64 * 1024  # boundaries and part headers around the file's bytes
_SAFE_SUFFIX = re.compile(r"^\.[A-Za-z0-9]{1,8}$")


class UploadTooLarge(ValueError):
    """The upload exceeds the configured limit (HTTP 413)."""


class UploadError(ValueError):
    """The multipart body is malformed or has no file part (HTTP 422)."""


@dataclass(frozen=True)
class Upload:
    path: Path  # the temporary slide file
    filename: str  # the client's file name, for messages only
    size_bytes: int


@asynccontextmanager
async def slide_upload(request: Request, upload_dir: str | None, max_bytes: int) -> AsyncIterator[Upload]:
    """Stream the request's ``file`` part to a temporary file; remove it on exit."""
    folder = Path(tempfile.mkdtemp(prefix="dual-attention-upload-", dir=upload_dir))
    try:
        yield await _receive(request, folder, max_bytes)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


async def _receive(request: Request, folder: Path, max_bytes: int) -> Upload:
    content_type, params = parse_options_header(request.headers.get("content-type"))
    if content_type != b"multipart/form-data" or b"boundary" not in params:
        raise UploadError("an upload must be multipart/form-data with a boundary, "
                          f"got content-type {request.headers.get('content-type')!r}")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes + _MULTIPART_OVERHEAD_BYTES:
        raise UploadTooLarge(f"upload of {int(declared)} bytes exceeds the limit of {max_bytes} bytes")

    state = _PartState(folder, max_bytes)
    parser = MultipartParser(params[b"boundary"], state.callbacks())
    body_bytes = 0
    try:
        async for chunk in request.stream():
            body_bytes += len(chunk)
            if body_bytes > max_bytes + _MULTIPART_OVERHEAD_BYTES:  # other parts count too
                raise UploadTooLarge(f"upload body exceeds the limit of {max_bytes} bytes")
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as error:
        raise UploadError(f"malformed multipart body: {error}") from None
    finally:
        state.close()
    if state.file_path is None:
        raise UploadError(f"the multipart body has no '{UPLOAD_FIELD}' part with a filename")
    if state.file_bytes == 0:
        raise UploadError(f"the uploaded file {state.filename!r} is empty")
    return Upload(path=state.file_path, filename=state.filename, size_bytes=state.file_bytes)


class _PartState:
    """Callbacks for python-multipart: headers of the current part, then its data to the file."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        self.file_path: Path | None = None
        self.filename = ""
        self.file_bytes = 0
        self._file: IO[bytes] | None = None
        self._writing = False
        self._header_field = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field_data,
            "on_header_value": self._header_value_data,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }

    def _part_begin(self) -> None:
        self._headers = {}
        self._writing = False

    def _header_field_data(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._header_field.strip().lower()] = self._header_value.strip()
        self._header_field, self._header_value = b"", b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition"))
        if options.get(b"name") != UPLOAD_FIELD.encode() or b"filename" not in options:
            return  # another form field: its bytes are ignored (and counted by the parser's limit)
        if self.file_path is not None:
            raise UploadError(f"more than one '{UPLOAD_FIELD}' part in the upload")
        self.filename = options[b"filename"].decode("utf-8", "replace")
        suffix = os.path.splitext(self.filename)[1]
        # The file keeps its extension (some formats are recognised by it) but never the client's name.
        self.file_path = self.folder / ("slide" + (suffix.lower() if _SAFE_SUFFIX.match(suffix) else ""))
        self._file = open(self.file_path, "wb")  # noqa: SIM115 - closed in _part_end or close()
        self._writing = True

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if not self._writing or self._file is None:
            return
        self.file_bytes += end - start
        if self.file_bytes > self.max_bytes:
            raise UploadTooLarge(f"upload {self.filename!r} exceeds the limit of {self.max_bytes} bytes")
        self._file.write(data[start:end])

    def _part_end(self) -> None:
        if self._writing and self._file is not None:
            self._file.close()
        self._writing = False

    def close(self) -> None:
        if self._file is not None and not self._file.closed:
            self._file.close()
