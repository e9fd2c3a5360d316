"""An increment's stats blob: the writer's statistics as a JSON object, encoded and decoded.

Decoding takes bytes that may be hostile and answers with a dict or a
:class:`~pyvmm.errors.FormatError`, nothing else. No I/O.
"""

from __future__ import annotations

import json
from typing import Any

from pyvmm.errors import FormatError
from pyvmm.migration.container_format import (
    MAX_STATS_BYTES,
    construct_call,
    load_spec,
    one_line_reason,
)


def encode_stats(increment: int, stats: dict[str, Any]) -> bytes:
    """The stats blob of ``increment``: ``stats`` as a JSON object (strict JSON: no NaN)."""
    spec = load_spec()
    text = json.dumps(stats, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    if len(text) > MAX_STATS_BYTES:
        raise ValueError(f"stats take {len(text)} bytes of JSON; at most {MAX_STATS_BYTES} fit")
    value = {"increment": increment, "json": text}
    return bytes(
        construct_call(
            lambda: spec.StatsBlob.build({"fields": {"value": value}}),
            "stats blob",
            increment=increment,
        )
    )


def decode_stats(data: bytes, *, increment: int, offset: int | None = None) -> dict[str, Any]:
    """The JSON object of a stats blob that must belong to ``increment`` (checked with its CRC)."""
    spec = load_spec()
    parsed = construct_call(
        lambda: spec.StatsBlob.parse(data), "stats blob", offset=offset, increment=increment
    )
    fields = parsed.fields.value
    if fields.increment != increment:
        raise FormatError(
            f"stats belong to increment {fields.increment}", offset=offset, increment=increment
        )
    try:
        stats = json.loads(bytes(fields.json).decode("utf-8"))
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError included
        raise FormatError(
            f"stats are not valid JSON: {one_line_reason(err)}", offset=offset, increment=increment
        ) from err
    if not isinstance(stats, dict):
        raise FormatError("stats are not a JSON object", offset=offset, increment=increment)
    return stats

