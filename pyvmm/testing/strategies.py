"""Hypothesis strategies for checkpoint tests: pages of a working region, page contents, writes.

Everything here is a pure description of guest-RAM activity (no machine is touched), so any test of
a checkpoint algorithm can draw from it: the state machines in :mod:`pyvmm.testing.stateful` do, and
so can a plain ``@given`` test that applies a :func:`write_schedules` round by round.
"""

from __future__ import annotations

import dataclasses
import random

from hypothesis import strategies as st

from ..ram import PAGE_SIZE

#: Pages in the working region the state machines model.  Small on purpose: writes then hit the
#: same pages again and again, which is where dirty tracking goes wrong.
REGION_PAGES = 16
#: Sizes of a guest store (strb, strh, str w, str x).
STORE_SIZES = (1, 2, 4, 8)


@dataclasses.dataclass(frozen=True)
class HostWrite:
    """``data`` written by host code at byte ``offset`` of region page ``page``."""

    page: int
    offset: int
    data: bytes

    def __repr__(self) -> str:  # short, so a shrunk schedule reads well
        shown = self.data[:8].hex() + ("…" if len(self.data) > 8 else "")
        return f"HostWrite(page={self.page}, offset={self.offset}, len={len(self.data)}, {shown})"


@dataclasses.dataclass(frozen=True)
class GuestStore:
    """One store instruction of ``size`` bytes of ``value`` at byte ``offset`` (size-aligned)."""

    page: int
    offset: int
    size: int
    value: int


def region_pages(count: int = REGION_PAGES) -> st.SearchStrategy[int]:
    """A page number of the working region, ``0 .. count-1`` (shrinks towards page 0)."""
    return st.integers(0, count - 1)


def _seeded_bytes(seed: int, length: int) -> bytes:
    # Drawing 4 KiB through st.binary is slow and shrinks badly; a seed is one number to shrink.
    return random.Random(seed).randbytes(length)


def sparse_pages(nonzero: int = 8) -> st.SearchStrategy[bytes]:
    """A page of zeros with up to ``nonzero`` non-zero bytes at drawn offsets."""

    def build(points: dict[int, int]) -> bytes:
        page = bytearray(PAGE_SIZE)
        for offset, value in points.items():
            page[offset] = value
        return bytes(page)

    return st.dictionaries(st.integers(0, PAGE_SIZE - 1), st.integers(1, 255),
                           min_size=1, max_size=nonzero).map(build)


def page_contents() -> st.SearchStrategy[bytes]:
    """Whole-page contents (4 KiB): all zero, one byte repeated, sparse, or dense random."""
    return st.one_of(
        st.just(bytes(PAGE_SIZE)),
        st.integers(1, 255).map(lambda b: bytes([b]) * PAGE_SIZE),
        sparse_pages(),
        st.integers(0, 2**32 - 1).map(lambda seed: _seeded_bytes(seed, PAGE_SIZE)),
    )


def page_writes(max_length: int = 256) -> st.SearchStrategy[tuple[int, bytes]]:
    """``(offset, data)`` inside one page: a short run of bytes, possibly crossing no page edge,
    or a whole page (offset 0).  ``data`` may be all zeros (a write that changes nothing is
    still a write)."""

    @st.composite
    def partial(draw: st.DrawFn) -> tuple[int, bytes]:
        length = draw(st.integers(1, max_length))
        offset = draw(st.integers(0, PAGE_SIZE - length))
        data = draw(st.one_of(
            st.just(bytes(length)),
            st.binary(min_size=length, max_size=length),
            st.integers(0, 2**32 - 1).map(lambda seed: _seeded_bytes(seed, length)),
        ))
        return offset, data

    return st.one_of(partial(), page_contents().map(lambda page: (0, page)))


def host_writes(count: int = REGION_PAGES) -> st.SearchStrategy[HostWrite]:
    """A host write into one page of a ``count``-page region."""
    return st.builds(lambda page, write: HostWrite(page, write[0], write[1]),
                     region_pages(count), page_writes())


@st.composite
def guest_stores(draw: st.DrawFn, count: int = REGION_PAGES) -> GuestStore:
    """A naturally aligned store of 1, 2, 4 or 8 bytes into one page of a ``count``-page region
    (aligned because ARM64 with the MMU off treats RAM as Device memory, where unaligned
    accesses fault on real hardware)."""
    page = draw(region_pages(count))
    size = draw(st.sampled_from(STORE_SIZES))
    offset = draw(st.integers(0, PAGE_SIZE // size - 1)) * size
    value = draw(st.one_of(st.just(0), st.integers(0, 2 ** (8 * size) - 1)))
    return GuestStore(page, offset, size, value)


def write_schedules(count: int = REGION_PAGES, max_rounds: int = 5,
                    max_writes: int = 8) -> st.SearchStrategy[list[list[HostWrite]]]:
    """Rounds of host writes, a checkpoint meant between rounds; a round may be empty (a
    checkpoint with nothing dirty)."""
    return st.lists(st.lists(host_writes(count), max_size=max_writes),
                    min_size=1, max_size=max_rounds)
