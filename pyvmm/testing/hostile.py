"""Hostile checkpoint files for property tests of readers: page indexes that lie.

A page index carries a CRC, so a flipped byte is caught by it; what a CRC cannot catch is a
writer (or an attacker) that wrote a wrong index and a correct CRC of it. :func:`lying_page_index`
makes such a file from a good one, and :func:`lies` is the matching hypothesis strategy, so a
test of any reader (reload strategies, lazy reload, verify) can demand that it refuses the file
as the container's decoder does, or loads what the others load.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from hypothesis import strategies as st

from ..migration.container import CheckpointFile
from ..migration.container_format import PageRun
from ..migration.page_index_format import encode_page_index

FIELDS = ("block", "first_page", "npages", "data_offset", "zero", "swap")


@dataclasses.dataclass(frozen=True)
class Lie:
    """Change run ``run`` (modulo the run count) of increment ``increment``'s page index:
    ``field`` moved by ``delta``, or (``swap``) exchanged with run ``other``, or (``zero``) its
    kind flipped; ``other`` also picks the data offset a run is moved onto."""

    increment: int
    run: int
    field: str
    delta: int
    other: int


def lies(increments: int) -> st.SearchStrategy[Lie]:
    """Lies about the page index of one of the first ``increments`` increments."""
    return st.builds(Lie, increment=st.integers(0, increments - 1),
                     run=st.integers(0, 1 << 16), field=st.sampled_from(FIELDS),
                     delta=st.integers(-3, 3), other=st.integers(0, 1 << 16))


def lying_page_index(path: Path, lie: Lie) -> tuple[bytes, str]:
    """The bytes of ``path`` with ``lie`` told in its page index (same length, valid CRC), and
    a description of the change."""
    with CheckpointFile.open(path) as container:
        info = container.header.increments[lie.increment]
        runs = container.page_index(lie.increment)
    i, j = lie.run % len(runs), lie.other % len(runs)
    victim = runs[i]
    if lie.field == "swap":
        runs[i], runs[j] = runs[j], runs[i]
    elif lie.field == "zero":
        runs[i] = victim._replace(zero=not victim.zero,
                                  data_offset=victim.data_offset or runs[j].data_offset)
    else:
        value = getattr(victim, lie.field)
        if lie.field == "block":
            value = max(0, value + lie.delta)
        elif lie.field == "data_offset" and not victim.zero:
            # onto another run's data (a zero run has none: then near the file's start)
            value = max(0, runs[j].data_offset + lie.delta * 4) if lie.delta else value + 8
        elif lie.field == "first_page":
            value = max(0, value + lie.delta)
        else:
            value = max(1, value + lie.delta)
        runs[i] = victim._replace(**{lie.field: value})
    blob = encode_page_index(lie.increment, [PageRun(r.block, r.first_page, r.npages,
                                                     r.data_offset, r.zero) for r in runs])
    assert len(blob) == info.index_length, "a lie keeps the index's length"
    damaged = bytearray(path.read_bytes())
    damaged[info.index_offset:info.index_offset + len(blob)] = blob
    return bytes(damaged), f"increment {lie.increment}: run {i} {victim} -> {runs[i]}"
