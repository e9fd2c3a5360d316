"""The checkpoint container's vocabulary: its declaration, its limits and the values it holds.

The layout is declared once in ``formats/chpt.construct.py`` (installed as ``pyvmm.formats``);
this module loads it (:func:`load_spec`), turns every construct failure into
:class:`~pyvmm.errors.FormatError` in one place (:func:`construct_call`), and defines the values
the container's records hold (RAM blocks, increments, the header, page runs). The codecs of the container's pieces sit above it, one per
piece, each taking bytes that may be hostile and answering with a value or a FormatError:
:mod:`~pyvmm.migration.header_format` (header slots), :mod:`~pyvmm.migration.page_index_format`
(page indexes), :mod:`~pyvmm.migration.stats_format` (stats) and
:mod:`~pyvmm.migration.checksum_format` (checksum blocks). None does I/O:
:mod:`pyvmm.migration.container` reads and writes the file.
"""

from __future__ import annotations

import array
import functools
import importlib.resources
import importlib.util
import itertools
import struct
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple, TypeVar, overload

import construct

from pyvmm.errors import ChecksumError, FormatError, PyvmmError

SPEC_PACKAGE = "pyvmm.formats"
SPEC_FILE = "chpt.construct.py"

KINDS = ("full", "incremental")
PAGE_RECORD_HEADER = 8
"""Bytes before each page's data in a stream (``be64 offset|flags``): the stride of a data run
is ``PAGE_RECORD_HEADER + page_size``."""

MIN_PAGE_SIZE = 512
MAX_PAGE_SIZE = 64 * 1024
MAX_NAME = 255  # names travel behind a u8 length, in the container and in the stream
MAX_CAPABILITY = 64
MAX_STATS_BYTES = 16 << 20
"""Largest stats JSON accepted: read whole into memory, so bounded."""
MAX_MAIN_RAM = 64 << 30
"""The most main RAM a pyvmm machine has (``Machine`` refuses more)."""
MAX_GUEST_RAM = MAX_MAIN_RAM + (1 << 30)
"""The most RAM, all blocks together, of a machine pyvmm builds: the main RAM and the blocks
below its base at 0x4000_0000 (a Linux program's image). A header laying out more is refused
when it is read, before a reader sizes anything by it (page tables, bitmaps, index buffers):
every per-page structure a reader allocates is bounded by this layout."""

_T = TypeVar("_T")


@functools.lru_cache(maxsize=1)
def load_spec() -> ModuleType:
    """The container declaration, ``formats/chpt.construct.py``, loaded once per process.

    Its name holds a dot, so it cannot be imported by name: it is executed from the installed
    ``pyvmm.formats`` package, or from the source tree when pyvmm runs uninstalled.
    """
    try:
        resource: Any = importlib.resources.files(SPEC_PACKAGE).joinpath(SPEC_FILE)
    except ModuleNotFoundError:
        # a source checkout on sys.path without `pip install`: formats/ sits beside pyvmm/
        resource = Path(__file__).resolve().parents[2] / "formats" / SPEC_FILE
    with importlib.resources.as_file(resource) as path:
        spec = importlib.util.spec_from_file_location(f"{SPEC_PACKAGE}.chpt", path)
        if spec is None or spec.loader is None:
            raise PyvmmError(f"cannot load the checkpoint format declaration {path}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


def construct_call(
    call: Callable[[], _T],
    what: str,
    *,
    offset: int | None = None,
    increment: int | None = None,
) -> _T:
    """Run one construct parse or build, turning every way it can fail into a FormatError.

    construct raises its own ``ConstructError`` tree, and its compiled parsers also leak
    ``struct.error``; a bad checksum becomes :class:`ChecksumError`. ``what`` names the structure
    for the message ("header slot 1", "page index"...).
    """
    try:
        return call()
    except construct.ChecksumError as err:
        raise ChecksumError(
            f"{what}: checksum mismatch", offset=offset, increment=increment
        ) from err
    except (construct.ConstructError, struct.error, UnicodeError) as err:
        raise FormatError(
            f"{what}: {one_line_reason(err)}", offset=offset, increment=increment
        ) from err


def one_line_reason(err: Exception) -> str:
    """The reason of an exception as one line, with construct's field path when it has one."""
    text = str(err)
    if isinstance(err, construct.ConstructError) and text.startswith("Error in path"):
        text = text.split("\n", 1)[1] if "\n" in text else ""  # drop construct's path line
    if isinstance(err, construct.ConstError):
        text = "unexpected bytes where a constant belongs"
    text = " ".join(text.split()) or type(err).__name__
    path = getattr(err, "path", None)
    if isinstance(path, str) and "->" in path:
        text = f"{text} (field {'.'.join(p.strip() for p in path.split('->')[1:])})"
    return text


# ----- what a header holds ---------------------------------------------------------------------


@dataclass(frozen=True)
class RamBlockInfo:
    """One RAM block as recorded in the file: its idstr, guest-physical address and size."""

    name: str
    gpa: int
    size: int


class PageRun(NamedTuple):
    """Pages ``first_page .. first_page+npages-1`` of RAM block number ``block`` in one increment.

    A data run's page ``k`` has its ``page_size`` bytes at file offset
    ``data_offset + k * (PAGE_RECORD_HEADER + page_size)``; a zero run has no data
    (``data_offset`` 0); a compressed run's records follow each other from the first one's
    ``be16`` length at ``data_offset`` (their lengths vary: such a run is read whole).

    A named tuple, not a dataclass: an increment of scattered pages has a run per page, and a
    tuple is built in a fifth of the time. Its field order is RAM order, so runs sort by it.
    """

    block: int
    first_page: int
    npages: int
    data_offset: int
    zero: bool
    compressed: bool = False


@dataclass(frozen=True)
class IncrementInfo:
    """One increment's entry in the header table: what it is and where its bytes lie."""

    index: int
    kind: str  # "full" | "incremental"
    parent: int  # -1 for a full increment
    created_ns: int
    stream_offset: int
    stream_length: int
    pages: int
    zero_pages: int
    stream_crc: int  # CRC-32C of the stream, 0 when not computed
    index_offset: int
    index_length: int
    stats_offset: int  # 0 with stats_length 0: no stats
    stats_length: int
    checksum_offset: int = 0  # 0 with checksum_length 0: no checksum block (always in format 1)
    checksum_length: int = 0

    @property
    def end(self) -> int:
        """File offset just past this increment's last byte (its checksum block, else its stats,
        else its page index)."""
        if self.checksum_length:
            return self.checksum_offset + self.checksum_length
        if self.stats_length:
            return self.stats_offset + self.stats_length
        return self.index_offset + self.index_length


@dataclass(frozen=True)
class ContainerHeader:
    """The contents of the current header slot."""

    format_version: int
    page_size: int
    vm_id: bytes
    machine: str
    ram_blocks: tuple[RamBlockInfo, ...]
    capabilities: tuple[str, ...]
    increments: tuple[IncrementInfo, ...]
    sequence: int

    @property
    def data_end(self) -> int:
        """File offset just past the last committed byte: where the next increment may start."""
        return self.increments[-1].end if self.increments else load_spec().DATA_START

    @property
    def total_pages(self) -> int:
        """Guest pages in all RAM blocks."""
        return sum(block.size // self.page_size for block in self.ram_blocks)

#: One page index record, as the page index blob stores a run (big-endian: block, flags,
#: reserved, npages, first page, data offset; the declaration's PageRun stays the reference).
INDEX_RECORD = struct.Struct(">HBBIQQ")
#: The index's flag of a zero run (the declaration's RUN_ZERO, which a test compares with it).
INDEX_RUN_ZERO = 0x01
#: The index's flag of a compressed run (the declaration's RUN_COMPRESSED).
INDEX_RUN_COMPRESSED = 0x02


_Run = TypeVar("_Run")


class RunSequence(Sequence[_Run]):
    """An immutable sequence whose items are made on access by ``_item`` (page runs held in a
    compact form: an increment of scattered pages has a run per page). Compares equal to any
    sequence of the same items, as a list would."""

    __slots__ = ()

    def _item(self, index: int) -> _Run:  # 0 <= index < len(self)
        raise NotImplementedError

    @overload
    def __getitem__(self, index: int) -> _Run: ...

    @overload
    def __getitem__(self, index: slice) -> list[_Run]: ...

    def __getitem__(self, index: int | slice) -> _Run | list[_Run]:
        count = len(self)
        if isinstance(index, slice):
            return [self._item(i) for i in range(*index.indices(count))]
        if index < 0:
            index += count
        if not 0 <= index < count:
            raise IndexError(f"page run {index} of {count}")
        return self._item(index)

    def __iter__(self) -> Iterator[_Run]:
        for i in range(len(self)):
            yield self._item(i)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, (str, bytes)):
            return NotImplemented
        return len(other) == len(self) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]  # compares equal to lists, which do not hash

    def __repr__(self) -> str:
        shown = ", ".join(repr(tuple(run)) for run in self[:4])  # type: ignore[arg-type]
        more = f", ... {len(self) - 4} more" if len(self) > 4 else ""
        return f"{type(self).__name__}([{shown}{more}])"


class IndexRecords(RunSequence[PageRun]):
    """Page runs held as the page index stores them: 24-byte big-endian records, one per run.

    A save of scattered pages has a run per page; it keeps them in this form from the C code
    that wrote them to the index blob, and a run becomes a :class:`PageRun` only when something
    asks for it (the runs are the index's bytes, so they encode without a step per run).
    The records are not checked here: :func:`check_page_runs` does that.
    """

    __slots__ = ("records",)

    def __init__(self, records: bytes = b"") -> None:
        if len(records) % INDEX_RECORD.size:
            raise ValueError(f"page index records are {INDEX_RECORD.size} bytes each")
        self.records = bytes(records)

    def __len__(self) -> int:
        return len(self.records) // INDEX_RECORD.size

    @staticmethod
    def _run(block: int, flags: int, _reserved: int, npages: int, first_page: int,
             data_offset: int) -> PageRun:
        return PageRun(block, first_page, npages, data_offset, bool(flags & INDEX_RUN_ZERO),
                       bool(flags & INDEX_RUN_COMPRESSED))

    def _item(self, index: int) -> PageRun:
        return self._run(*INDEX_RECORD.unpack_from(self.records, index * INDEX_RECORD.size))

    def __iter__(self) -> Iterator[PageRun]:
        run = self._run
        for fields in INDEX_RECORD.iter_unpack(self.records):
            yield run(*fields)

    def pages(self) -> int:
        """Pages the runs list, data and zero."""
        return sum(self._npages())

    def data_counts(self) -> tuple[int, int]:
        """``(data runs, data pages)``: the runs and pages that are not zero runs."""
        flags = self.records[2::INDEX_RECORD.size]  # each record's flags byte
        data = list(itertools.compress(self._npages(), [not f & INDEX_RUN_ZERO for f in flags]))
        return len(data), sum(data)

    def _npages(self) -> array.array[int]:
        # each record's be32 npages is its second 4-byte word: picked out without a Python
        # step per run
        words = array.array("I", memoryview(self.records).cast("I")[1::6].tobytes())
        if sys.byteorder == "little":
            words.byteswap()
        return words

    def __eq__(self, other: object) -> bool:
        if isinstance(other, IndexRecords):
            return self.records == other.records
        return super().__eq__(other)

    __hash__ = None
