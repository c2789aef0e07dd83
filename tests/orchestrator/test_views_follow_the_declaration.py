"""The status table and the history chart show what the snapshot declaration says: every
column is a stored field, units come from the declaration, one chart row per history
field."""

from __future__ import annotations

from chiffon_worker.cli.history_charts import SERIES
from chiffon_worker.cli.status_table import METRIC_COLUMNS, TABLE_HEADERS
from chiffon_worker.snapshot import FIELDS_BY_NAME, HISTORY_FIELDS, STORED_METRICS

STORED = {field.name for field in STORED_METRICS}


def test_every_status_column_shows_stored_fields() -> None:
    for column in METRIC_COLUMNS:
        assert column.field in STORED
        assert column.total is None or column.total in STORED


def test_status_headers_carry_the_declared_unit() -> None:
    assert "MEM GiB" in TABLE_HEADERS and "VRAM GiB" in TABLE_HEADERS
    for column in METRIC_COLUMNS:
        unit = FIELDS_BY_NAME[column.field].unit
        assert column.header.endswith(unit)


def test_the_history_chart_has_one_series_per_history_field() -> None:
    assert [(label, unit) for label, unit, _ in SERIES] == [
        (field.label, field.unit_suffix) for field in HISTORY_FIELDS]
