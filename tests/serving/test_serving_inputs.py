"""The tabular parsers' fast path for rows of floats gives what the general path gives."""

from __future__ import annotations

import math

import pytest

from serving import inputs
from serving.errors import ServingError
from serving.inputs import Column, TabularSchema

SCHEMAS = {
    "doubles": [Column("a", "double"), Column("b", "double"), Column("c", "double")],
    "float_and_double": [Column("a", "float"), Column("b", "double"), Column("c", "double")],
    "long_column": [Column("a", "long"), Column("b", "double"), Column("c", "double")],
    "floats32": [Column("a", "float"), Column("b", "float"), Column("c", "float")],
    "integers": [Column("a", "integer"), Column("b", "long"), Column("c", "long")],
}
BODIES = {
    "floats": [[0.1, -2.5, 3.0], [1e300, -0.0, 5e-324]],
    "integral_floats": [[1.0, 2.0, 3.0]],
    "fractional_in_long": [[1.5, 2.0, 3.0]],
    "ints_and_floats": [[1, 2.5, 3]],
    "big_int": [[0.5, 2**70, 1.0]],
    "boolean": [[True, 2.5, 3.0]],
    "string": [["1.5", 2.5, 3.0]],
    "null": [[None, 2.5, 3.0]],
    "ragged": [[1.0, 2.0], [1.0, 2.0, 3.0]],
    "nested": [[[1.0], 2.0, 3.0]],
    "not_a_row": [1.0, [1.0, 2.0, 3.0]],
    "nan_and_inf": [[math.nan, math.inf, -math.inf]],
}


def parse(schema: TabularSchema, rows):
    try:
        got = schema.from_rows(rows)
    except ServingError as exc:
        return ("error", exc.status, exc.code, exc.message)
    if got.matrix is not None:
        return ("matrix", got.matrix.dtype.str, got.matrix.shape, got.matrix.tobytes())
    return ("columns", {k: (v.dtype.str, v.tobytes()) for k, v in got.columns.items()})


@pytest.mark.parametrize("schema_name", SCHEMAS)
@pytest.mark.parametrize("body_name", BODIES)
def test_rows_of_floats_parse_as_the_general_path_parses_them(schema_name, body_name, monkeypatch):
    schema = TabularSchema(SCHEMAS[schema_name])
    rows = BODIES[body_name]
    fast = parse(schema, rows)
    monkeypatch.setattr(inputs, "_float_matrix", lambda rows, k: (None, None))
    assert parse(schema, rows) == fast


def test_the_fast_path_takes_only_rows_of_k_floats():
    matrix, _ = inputs._float_matrix([[0.5, 1.5], [2.5, -3.5]], 2)
    assert matrix.tolist() == [[0.5, 1.5], [2.5, -3.5]]
    for rows in ([[1, 1.5]], [[True, 1.5]], [[0.5, 1.5], [0.5]], [0.5, 1.5], [[0.5, "x"]]):
        assert inputs._float_matrix(rows, 2)[0] is None, rows
    # rows of k values that are not all floats: their types, so booleans are not looked for twice
    assert inputs._float_matrix([[1, True]], 2) == (None, {int, bool})
    assert inputs._float_matrix([[0.5], [0.5, 1.5]], 2) == (None, None)
