"""Multipart form bodies, parsed as they arrive with ``python-multipart``.

The protocol feeds each piece of a ``multipart/form-data`` body to the parser the moment
it is read, so an upload never sits in memory whole: a file part stays in memory up to
``HttpProtocol.upload_memory_limit`` bytes and is then moved to a temporary file (in
``HttpProtocol.upload_dir``, or the system's temporary folder) that is deleted when the
:class:`UploadedFile` is closed or garbage-collected.
"""

from __future__ import annotations

import os
import re
import shutil
from typing import IO, Any

from ...errors import ProtocolError

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
    """Feeds a multipart body to python-multipart and collects its fields and files."""

    __slots__ = ("parser", "fields", "files")

    def __init__(self, content_type: bytes, memory_limit: int, upload_dir: str | None) -> None:
        from python_multipart.multipart import FormParser, parse_options_header

        media_type, options = parse_options_header(content_type)
        boundary = options.get(b"boundary")
        if not boundary:
            raise ProtocolError("multipart body without a boundary")
        self.fields: list[tuple[str, Any]] = []
        self.files: list[tuple[str, Any]] = []
        config: dict[str, Any] = {"MAX_MEMORY_FILE_SIZE": memory_limit}
        if upload_dir is not None:
            config["UPLOAD_DIR"] = upload_dir
        self.parser = FormParser(media_type.decode("latin-1"), self._on_field, self._on_file, boundary=boundary, config=config)

    def _on_field(self, field: Any) -> None:
        name = (field.field_name or b"").decode("utf-8", "replace")
        value = field.value
        self.fields.append((name, value.decode("utf-8", "replace") if value is not None else ""))

    def _on_file(self, file: Any) -> None:
        upload = UploadedFile(file)
        self.files.append((upload.field_name, upload))

    def write(self, data: bytes) -> None:
        """Parse the next piece of the body."""
        try:
            self.parser.write(data)
        except Exception as exc:
            raise ProtocolError(f"malformed multipart body: {exc}") from None

    def finish(self) -> None:
        """The body is complete."""
        try:
            self.parser.finalize()
        except Exception as exc:
            raise ProtocolError(f"malformed multipart body: {exc}") from None
