"""Streaming a metadata CSV into ``COPY ... FROM STDIN``: its bytes as they are, or transformed so that
the columns the schema does not type travel as one jsonb object, in bounded memory whatever the file size.

Blocks of plain lines (what metadata CSVs hold) are split on commas as bytes; from the first block
that is not plain, the ``csv`` module takes over. Both give the same rows and the same errors.
"""

from __future__ import annotations

import csv
import io
import json
import operator
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

CHUNK_BYTES = 1 << 20
TRANSFORM_ROWS = 10_000
UTF8_BOM = b"\xef\xbb\xbf"
# Bytes a line may hold without the csv module: all but quotes, backslashes and control characters
# (a line feed ends a row). ``block.translate(None, PLAIN)`` is empty for a plain block.
PLAIN = bytes(b for b in range(256) if b == 0x0A or (b >= 0x20 and b not in b'"\\'))


class CsvFormatError(ValueError):
    """A row with the wrong number of fields, or no header; the message names the file and line."""


def read_header(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8-sig") as handle:
        header = next(csv.reader(handle), None)
    if not header:
        raise CsvFormatError(f"{path}: empty file, no CSV header")
    return header


def raw_chunks(path: Path) -> Iterator[bytes]:
    """The file's bytes, unchanged, chunk by chunk."""
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            yield chunk


def transformed_chunks(path: Path, name: str, keep: list[int], extra: list[tuple[int, str]]) -> Iterator[bytes]:
    """The file with only the ``keep`` columns, plus a jsonb object of the ``extra`` ones (index, name), chunk by
    chunk; errors name the file as ``name``.

    Blocks of lines without quotes, backslashes or control characters (what metadata CSVs hold)
    are split on commas as bytes; from the first block that has any, the rest of the file goes
    through the ``csv`` module. Both give the same rows and the same errors (file and line).
    """
    with open(path, "rb") as handle:
        header_line = handle.readline()
        if header_line.startswith(UTF8_BOM):
            header_line = header_line[len(UTF8_BOM):]
        n_fields = len(next(csv.reader([header_line.decode()]), []))
        yield header_line if header_line.endswith(b"\n") else header_line + b"\n"
        line_number = 1  # lines of the file read so far
        split = _SplitRows(n_fields, keep, extra)
        pending = b""
        while True:
            block = handle.read(CHUNK_BYTES)
            data = pending + block
            end = data.rfind(b"\n") + 1 if block else len(data)
            if not data:
                return
            if end == 0:  # no complete line yet: read on
                pending = data
                continue
            lines, pending = data[:end], data[end:]
            if lines.translate(None, PLAIN):
                break
            try:
                yield split.block(lines)
            except _FieldCount as bad:
                raise CsvFormatError(f"{name}: line {line_number + bad.index + 1}: {bad.found} fields, "
                                f"the header has {n_fields}") from None
            line_number += lines.count(b"\n") + (not lines.endswith(b"\n"))
            if not block:
                return
        # The rest of the file, from the first line of the block that is not plain, by the csv module.
        yield from _csv_transformed(name, handle, lines + pending, line_number, n_fields, keep, extra)


def _csv_transformed(name: str, handle: BinaryIO, head: bytes, line_number: int, n_fields: int,
                     keep: list[int], extra: list[tuple[int, str]]) -> Iterator[bytes]:
    """The general transform of the rest of the file (``head``, then ``handle``'s remaining bytes)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    text = io.TextIOWrapper(_Prepended(head, handle), encoding="utf-8", newline="")
    reader = csv.reader(text)
    for row in reader:
        if len(row) != n_fields:
            raise CsvFormatError(f"{name}: line {line_number + reader.line_num}: {len(row)} fields, "
                            f"the header has {n_fields}")
        writer.writerow([row[i] for i in keep]
                        + [json.dumps({name: row[i] or None for i, name in extra}, ensure_ascii=False)])
        if reader.line_num % TRANSFORM_ROWS == 0:
            yield buffer.getvalue().encode()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue().encode()


class _Prepended(io.RawIOBase):
    """``head`` followed by the rest of ``handle``, as one readable binary stream."""

    def __init__(self, head: bytes, handle: BinaryIO) -> None:
        self.head, self.handle = head, handle

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.head:
            n = min(len(buffer), len(self.head))
            buffer[:n] = self.head[:n]
            self.head = self.head[n:]
            return n
        data = self.handle.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)


class _FieldCount(Exception):
    def __init__(self, index: int, found: int) -> None:
        self.index, self.found = index, found


class _SplitRows:
    """Rows of a block of plain lines (no quote, backslash or control character) as COPY csv lines."""

    def __init__(self, n_fields: int, keep: list[int], extra: list[tuple[int, str]]) -> None:
        self.n_fields = n_fields
        self.pick_prefix = keep if keep == list(range(len(keep))) else None
        self.pick = operator.itemgetter(*keep) if len(keep) > 1 else (lambda row: (row[keep[0]],)) if keep \
            else (lambda row: ())
        self.unknown = [i for i, _ in extra]
        # json.dumps of the names, then quoted for CSV (inner quotes doubled).
        self.keys = [json.dumps(name, ensure_ascii=False).replace('"', '""').encode() + b": " for _, name in extra]
        self.comma = b"," if keep else b""

    def block(self, lines: bytes) -> bytes:
        rows = lines.split(b"\n")
        if rows[-1] == b"":
            rows.pop()
        if self.pick_prefix is not None and self.unknown == list(range(len(self.pick_prefix), self.n_fields)):
            return self._trailing(rows)
        out = []
        append, pick, n_fields, unknown, keys, comma = (out.append, self.pick, self.n_fields, self.unknown,
                                                        self.keys, self.comma)
        for index, line in enumerate(rows):
            row = line.split(b",")
            if len(row) != n_fields:
                raise _FieldCount(index, 0 if line == b"" else len(row))
            fields = [b'""' + row[i] + b'""' if row[i] else b"null" for i in unknown]
            append(b",".join(pick(row)) + comma + b'"{'
                   + b", ".join(key + value for key, value in zip(keys, fields, strict=True)) + b'}"')
        out.append(b"")
        return b"\n".join(out)

    def _trailing(self, rows: list[bytes]) -> bytes:
        """The unknown columns are the last ones, the typed ones keep their order: split those off."""
        out = []
        append, n_unknown, commas, keys = out.append, len(self.unknown), self.n_fields - 1, self.keys
        head = self.comma + b'"{'
        for index, line in enumerate(rows):
            if line.count(b",") != commas:
                raise _FieldCount(index, 0 if line == b"" else line.count(b",") + 1)
            row = line.rsplit(b",", n_unknown)
            append(row[0] + head + b", ".join(key + (b'""' + value + b'""' if value else b"null")
                                              for key, value in zip(keys, row[1:], strict=True)) + b'}"')
        out.append(b"")
        return b"\n".join(out)
