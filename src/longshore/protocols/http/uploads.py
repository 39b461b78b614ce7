"""Multipart form bodies, parsed as they arrive with ``python-multipart``.

The protocol feeds each piece of a ``multipart/form-data`` body to the parser the moment
it is read, so an upload never sits in memory whole: a file part stays in memory up to
``HttpProtocol.upload_memory_limit`` bytes and is then moved to a temporary file (in
``HttpProtocol.upload_dir``, or the system's temporary folder) that is deleted when the
:class:`UploadedFile` is closed or garbage-collected, when the connection closes before
the request is complete, and at the latest when the worker process ends.

A body that is not well formed (a part without a name, bad encoding, a body that ends
before its closing boundary or is empty) is a :class:`~longshore.errors.ProtocolError`:
the protocol answers 400. ``python-multipart``'s own log lines (a line for each file moved
to disk, a warning for each malformed body) are left out: its logger is set to ``ERROR``
here, unless the application set a level of its own before.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import weakref
from typing import IO, Any

from ...errors import ProtocolError

_multipart_log = logging.getLogger("python_multipart")
if _multipart_log.level == logging.NOTSET:
    _multipart_log.setLevel(logging.ERROR)

#: Control characters, which have no place in a file name.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def safe_filename(name: str, default: str = "upload") -> str:
    """A client's file name made fit to save under in a folder of yours: only its last
    component (after any ``/`` or ``\\``), without control characters, surrounding
    spaces or leading dots (no ``..``, no hidden file), at most 255 bytes in UTF-8 (the
    extension kept); ``default`` when nothing is left.

    It cannot leave the folder, but two uploads may still have the same name, and the
    extension is the client's choice: check what you accept.
    """
    name = _CONTROL.sub("", name.replace("\\", "/").rsplit("/", 1)[-1]).strip().lstrip(".").strip()
    if len(name.encode("utf-8")) > 255:
        stem, extension = os.path.splitext(name)
        if len(extension.encode("utf-8")) > 32:
            stem, extension = name, ""
        stem = stem.encode("utf-8")[: 255 - len(extension.encode("utf-8"))].decode("utf-8", "ignore")
        name = stem + extension
    return name or default


class UploadedFile:
    """One uploaded file of a multipart request (``request.files["avatar"]``).

    ``field_name``, ``filename`` (exactly as the client named it: it may hold ``../``,
    a full path or control characters, so never join it to a folder as it is; use
    ``safe_filename``), ``content_type``, ``size``, ``file`` (a binary file object
    positioned at the start), ``path`` (the temporary file on disk, or None while the
    upload is held in memory), ``read()``, ``save(dest)``.
    """

    __slots__ = ("field_name", "filename", "content_type", "size", "file", "path", "_source")

    def __init__(self, source: Any) -> None:
        self._source = source  # keeps python-multipart's File (and its temporary file) alive
        self.field_name = (source.field_name or b"").decode("utf-8", "replace")
        self.filename = (source.file_name or b"").decode("utf-8", "replace")
        self.content_type = getattr(source, "content_type", None) or "application/octet-stream"
        self.size = source.size
        self.file: IO[bytes] = source.file_object
        self.file.seek(0)
        actual = None if source.in_memory else source.actual_file_name
        self.path = os.fsdecode(actual) if actual else None

    @property
    def safe_filename(self) -> str:
        """:attr:`filename` reduced to a safe name in a folder (see :func:`safe_filename`)."""
        return safe_filename(self.filename)

    @property
    def in_memory(self) -> bool:
        """True while the upload is small enough to be held in memory."""
        return self.path is None

    def read(self) -> bytes:
        """The whole content (read from the start)."""
        self.file.seek(0)
        return self.file.read()

    def save(self, destination: str | os.PathLike[str]) -> None:
        """Copy the content to ``destination``."""
        self.file.seek(0)
        with open(destination, "wb") as out:
            shutil.copyfileobj(self.file, out, 1024 * 1024)

    def close(self) -> None:
        """Close the file (a temporary file on disk is deleted)."""
        self.file.close()

    def __repr__(self) -> str:
        return f"<UploadedFile {self.field_name}={self.filename!r} {self.size} bytes>"


class MultipartReader:
    """Feeds a multipart body to python-multipart's part parser and collects its fields
    and files.

    It makes each part's :class:`File` or :class:`Field` itself, so it knows the file being
    written at any moment: :meth:`close` (the connection closed before the body was
    complete) closes every file of the request, deleting those on disk. Every upload's
    file is also in a registry that :func:`remove_temporary_files` empties when the worker
    process ends, so no temporary file outlives its worker.
    """

    __slots__ = ("parser", "fields", "files", "_config", "_headers", "_header_name", "_header_value", "_part", "_writer", "_is_file")

    def __init__(self, content_type: bytes, memory_limit: int, upload_dir: str | None) -> None:
        from python_multipart.multipart import MultipartParser, parse_options_header

        _media_type, options = parse_options_header(content_type)
        boundary = options.get(b"boundary")
        if not boundary:
            raise ProtocolError("multipart body without a boundary")
        self.fields: list[tuple[str, Any]] = []
        self.files: list[tuple[str, Any]] = []
        self._config: dict[str, Any] = {"MAX_MEMORY_FILE_SIZE": memory_limit, "UPLOAD_DIR": upload_dir}
        self._headers: dict[bytes, bytes] = {}
        self._header_name: list[bytes] = []
        self._header_value: list[bytes] = []
        self._part: Any = None  # the File or Field being written
        self._writer: Any = None  # the part, or a decoder in front of it
        self._is_file = False
        callbacks: Any = {
            "on_part_begin": self._on_part_begin,
            "on_part_data": self._on_part_data,
            "on_part_end": self._on_part_end,
            "on_header_field": self._on_header_field,
            "on_header_value": self._on_header_value,
            "on_header_end": self._on_header_end,
            "on_headers_finished": self._on_headers_finished,
        }
        self.parser: MultipartParser | None = MultipartParser(boundary, callbacks)

    # python-multipart's callbacks
    def _on_part_begin(self) -> None:
        self._headers = {}

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name.append(data[start:end])

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value.append(data[start:end])

    def _on_header_end(self) -> None:
        self._headers[b"".join(self._header_name).lower()] = b"".join(self._header_value).strip(b" \t")
        self._header_name.clear()
        self._header_value.clear()

    def _on_headers_finished(self) -> None:
        from python_multipart.decoders import Base64Decoder, QuotedPrintableDecoder
        from python_multipart.multipart import Field, File, parse_options_header

        headers = self._headers
        _disposition, options = parse_options_header(headers.get(b"content-disposition"))
        field_name = options.get(b"name")
        if field_name is None:
            raise ValueError("a part without a field name")
        file_name = options.get(b"filename")
        part_type = headers.get(b"content-type")
        content_type = part_type.decode("latin-1") if part_type is not None else None
        part: Any
        if file_name is None:
            part = Field(field_name, content_type=content_type)
            self._is_file = False
        else:
            part = File(file_name, field_name, config=self._config, content_type=content_type)  # type: ignore[arg-type]
            _live_files.add(part)
            self._is_file = True
        self._part = part
        encoding = headers.get(b"content-transfer-encoding", b"7bit").lower()
        if encoding == b"base64":
            self._writer = Base64Decoder(part)
        elif encoding == b"quoted-printable":
            self._writer = QuotedPrintableDecoder(part)
        else:
            self._writer = part

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        self._writer.write(data[start:end])

    def _on_part_end(self) -> None:
        part, self._part = self._part, None
        writer, self._writer = self._writer, None
        writer.finalize()
        if self._is_file:
            upload = UploadedFile(part)
            self.files.append((upload.field_name, upload))
        else:
            name = (part.field_name or b"").decode("utf-8", "replace")
            value = part.value
            self.fields.append((name, value.decode("utf-8", "replace") if value is not None else ""))

    def write(self, data: bytes) -> None:
        """Parse the next piece of the body."""
        assert self.parser is not None, "write() after finish()"
        try:
            self.parser.write(data)
        except Exception as exc:
            raise ProtocolError(f"malformed multipart body: {exc}") from None

    def finish(self) -> None:
        """The body is complete: ProtocolError unless it ended with its closing boundary
        (an empty body too; whatever follows that boundary, the epilogue, is ignored)."""
        from python_multipart.multipart import MultipartState

        parser = self.parser
        assert parser is not None, "finish() twice"
        try:
            parser.finalize()
            if parser.state != MultipartState.END:
                raise ValueError("the body ends before its closing boundary")
        except Exception as exc:
            raise ProtocolError(f"malformed multipart body: {exc}") from None
        finally:
            # The parser holds this reader's bound methods: dropping it breaks the cycle,
            # so the uploads go as soon as the application lets go of the request.
            self.parser = None

    def close(self) -> None:
        """The request will not be delivered: close its files (deleting those on disk)."""
        part, self._part = self._part, None
        self._writer = None
        if part is not None and self._is_file:
            part.close()
        for _name, upload in self.files:
            upload.close()


#: Every upload's python-multipart File still alive in this process (weakly held).
_live_files: weakref.WeakSet[Any] = weakref.WeakSet()


def remove_temporary_files() -> None:
    """Close every upload file still open (a temporary file on disk is deleted): the worker
    process ends, and requests the application still held take theirs with them."""
    for file in list(_live_files):
        try:
            file.close()
        except Exception:
            pass
