"""The binary COPY encoder that stages expression arrays: rows it encodes, as PostgreSQL reads them back."""

from __future__ import annotations

import math

import numpy as np
import pytest
from psycopg import sql

from etl import db
from etl.aggregate.warehouse import FLOAT8, INT4, array_field, binary_copy, int_field, text_field
from tests.conftest import SERVER_URL

COLUMNS = ["id", "label", "ints", "floats"]
INT32 = np.iinfo(np.int32)
TINY = np.finfo(np.float64).smallest_subnormal


@pytest.fixture
def conn():
    """A connection with a temporary table of every type the encoder writes (gone with the session)."""
    with db.copy_connection(SERVER_URL) as connection:
        connection.execute("CREATE TEMPORARY TABLE encoded (id int4, label text, ints int4[], floats float8[])")
        yield connection


def _copy(conn, rows: list[tuple[int, str, np.ndarray, np.ndarray]]) -> list[tuple]:
    """``rows`` through the encoder into the table, then read back with each array's bounds."""
    with binary_copy(conn, sql.Identifier("encoded"), COLUMNS) as row:
        for id_, label, ints, floats in rows:
            row(int_field(id_), text_field(label), array_field(ints, INT4), array_field(floats, FLOAT8))
    return conn.execute(
        "SELECT id, label, ints, floats, array_ndims(ints), array_lower(ints, 1), array_upper(ints, 1),"
        " array_ndims(floats), array_lower(floats, 1), array_upper(floats, 1) FROM encoded ORDER BY id").fetchall()


def _assert_read_back(read: tuple, expected: tuple[int, str, np.ndarray, np.ndarray]) -> None:
    id_, label, ints, floats = expected
    assert read[:2] == (id_, label)
    np.testing.assert_array_equal(np.array(read[2], np.int64), ints)
    np.testing.assert_array_equal(np.array(read[3], np.float64), floats)  # NaN equals NaN here
    for values, (ndims, lower, upper) in ((ints, read[4:7]), (floats, read[7:10])):
        # An empty array has no dimensions; any other is one-dimensional from 1, as '{...}' reads.
        assert (ndims, lower, upper) == ((None, None, None) if len(values) == 0 else (1, 1, len(values)))


def test_rows_read_back_as_encoded(conn):
    strided = np.arange(10.0).reshape(5, 2)[:, 1]  # a column of GroupStats.sums is a strided view
    rows = [
        (0, "", np.array([], np.int32), np.array([], np.float64)),
        (1, "Gad1 — β-ü", np.array([0, -1, INT32.min, INT32.max], np.int32),
         np.array([0.0, -0.0, -1.5, 1e308, TINY, math.inf, -math.inf, math.nan])),
        (INT32.max, "x", np.array([7], np.int32), strided),
        (INT32.min, "only ints", np.array([3, 1, 2], np.int32), np.array([], np.float64)),
    ]
    read = _copy(conn, rows)
    assert len(read) == len(rows)
    for got, expected in zip(read, sorted(rows, key=lambda r: r[0]), strict=True):
        _assert_read_back(got, expected)
    assert math.copysign(1.0, read[2][3][1]) == -1.0  # -0.0 keeps its sign


def test_rows_past_the_write_buffer_arrive_whole(conn):
    """More than the 8 MiB the encoder buffers before it writes: every row whole, none twice."""
    rng = np.random.default_rng(5)
    rows = [(i, f"row {i}", rng.integers(INT32.min, INT32.max, 3_000, dtype=np.int32), rng.normal(size=60_000))
            for i in range(20)]
    read = _copy(conn, rows)
    assert [r[0] for r in read] == list(range(20))
    for got, expected in zip(read, rows, strict=True):
        _assert_read_back(got, expected)
