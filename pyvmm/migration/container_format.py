"""The checkpoint container's bytes: its construct declaration loaded, and the encoding,
decoding and checking of header slots, page indexes and stats.

The layout is declared once in ``formats/chpt.construct.py`` (installed as ``pyvmm.formats``);
this module loads it (:func:`load_spec`), turns every construct failure into
:class:`~pyvmm.errors.FormatError` in one place (:func:`construct_call`), and adds the checks a
declaration cannot express: page sizes, RAM blocks that do not overlap, an increment table whose
pieces follow each other in the file, page runs inside their RAM block and their stream. Every
decoder takes bytes that may be hostile and answers with a value or a FormatError, nothing else.
It does no I/O: :mod:`pyvmm.migration.container` reads and writes the file.
"""

from __future__ import annotations

import array
import functools
import importlib.resources
import importlib.util
import itertools
import json
import struct
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple, TypeVar, overload

import construct

from pyvmm.errors import ChecksumError, FormatError, PyvmmError, VersionError

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
            f"{what}: {_one_line(err)}", offset=offset, increment=increment
        ) from err


def _one_line(err: Exception) -> str:
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
    (``data_offset`` 0).

    A named tuple, not a dataclass: an increment of scattered pages has a run per page, and a
    tuple is built in a fifth of the time. Its field order is RAM order, so runs sort by it.
    """

    block: int
    first_page: int
    npages: int
    data_offset: int
    zero: bool


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


# ----- encoding and decoding the structures -----------------------------------------------------


def _entry_value(info: IncrementInfo, version: int) -> dict[str, Any]:
    v1 = {
        "kind": info.kind,
        "index": info.index,
        "parent": info.parent,
        "created_ns": info.created_ns,
        "stream_offset": info.stream_offset,
        "stream_length": info.stream_length,
        "pages": info.pages,
        "zero_pages": info.zero_pages,
        "stream_crc": info.stream_crc,
        "index_offset": info.index_offset,
        "index_length": info.index_length,
        "stats_offset": info.stats_offset,
        "stats_length": info.stats_length,
    }
    if version == 1:
        if info.checksum_length or info.checksum_offset:
            raise ValueError(f"format 1 has no checksum block (increment {info.index})")
        return v1
    return {
        "v1": v1,
        "checksum_offset": info.checksum_offset,
        "checksum_length": info.checksum_length,
    }


def _body_value(header: ContainerHeader) -> dict[str, Any]:
    return {
        "page_size": header.page_size,
        "vm_id": header.vm_id,
        "machine": header.machine,
        "ram_blocks": [{"name": b.name, "gpa": b.gpa, "size": b.size} for b in header.ram_blocks],
        "capabilities": list(header.capabilities),
        "increments": [
            {"fields": {"value": _entry_value(i, header.format_version)}}
            for i in header.increments
        ],
    }


def encode_header_slot(header: ContainerHeader) -> bytes:
    """The bytes of one header slot holding ``header`` (unpadded; at most ``SLOT_SIZE``), in the
    header's format version (any this pyvmm reads: appends keep a file's version)."""
    spec = load_spec()
    if spec.HEADER_BODIES.get(header.format_version) is None:
        raise ValueError(f"pyvmm cannot write format version {header.format_version}")
    body = _encode_header_body_fast(header)
    if body is None:
        body = _encode_header_body_construct(header)
    if len(body) + spec.SLOT_OVERHEAD > spec.SLOT_SIZE:
        raise FormatError(
            f"the header needs {len(body) + spec.SLOT_OVERHEAD} bytes but a header slot holds "
            f"{spec.SLOT_SIZE}"
        )
    try:
        frame = _SLOT_FRAME.pack(spec.MAGIC, spec.BYTE_ORDER_MARK, header.format_version,
                                 len(body) + spec.SLOT_OVERHEAD, header.sequence) + body
    except struct.error:  # a value that does not fit: the declaration names it
        value = {"format_version": header.format_version, "sequence": header.sequence,
                 "body": body}
        return bytes(
            construct_call(lambda: spec.HeaderSlot.build({"frame": {"value": value}}), "header")
        )
    return frame + _SLOT_CRC.pack(spec.crc32(frame))


def _encode_header_body_construct(header: ContainerHeader) -> bytes:
    """The header body by the format declaration: the reference, and the error messages."""
    declaration = load_spec().HEADER_BODIES[header.format_version]
    return bytes(construct_call(lambda: declaration.build(_body_value(header)), "header"))


def _encode_header_body_fast(header: ContainerHeader) -> bytes | None:
    """The body :func:`_encode_header_body_construct` builds, with struct for the increment
    table (construct's cost grew with the chain: 5 ms a checkpoint at 99 increments), or
    ``None`` for a value some field cannot hold, which the declaration then names. The part
    before the table is the same for every increment of a file: built once by construct."""
    version = header.format_version
    entry = _INCREMENT_ENTRY.get(version)
    if entry is None:
        return None
    spec = load_spec()
    crc32, kinds = spec.crc32, spec.INCREMENT_KINDS
    try:
        head = _header_body_head(version, header.page_size, header.vm_id, header.machine,
                                 header.ram_blocks, header.capabilities)
        parts = [head, _COUNT.pack(len(header.increments))]
        for info in header.increments:
            if info.kind not in kinds or (
                    version == 1 and (info.checksum_offset or info.checksum_length)):
                return None
            values: tuple[Any, ...] = (kinds[info.kind], bytes(3), info.index, info.parent,
                      info.created_ns, info.stream_offset, info.stream_length, info.pages,
                      info.zero_pages, info.stream_crc, info.index_offset, info.index_length,
                      info.stats_offset, info.stats_length)
            if version >= 2:
                values += (info.checksum_offset, info.checksum_length)
            fields = entry.pack(*values)
            parts += (fields, _ENTRY_CRC.pack(crc32(fields)))
    except (struct.error, FormatError, ValueError, TypeError):
        return None
    return b"".join(parts)


@functools.lru_cache(maxsize=8)
def _header_body_head(version: int, page_size: int, vm_id: bytes, machine: str,
                      ram_blocks: tuple[RamBlockInfo, ...], capabilities: tuple[str, ...]) -> bytes:
    """The header body up to its increment table (construct raises for values that do not
    fit; the caller then leaves the whole body to construct)."""
    empty = ContainerHeader(version, page_size, vm_id, machine, ram_blocks, capabilities, (), 0)
    body = _encode_header_body_construct(empty)
    return body[:-_COUNT.size]  # without the table's (zero) count


#: The slot frame before the body, and the CRC after it; the count of the increment table; the
#: increment entries of format 1 and 2 (fields, then their CRC). The declaration stays the
#: reference: a property test checks these give its bytes.
_SLOT_FRAME = struct.Struct(">8sIIIQ")
_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")
_GPA_SIZE = struct.Struct(">QQ")
_SLOT_CRC = struct.Struct(">I")
_COUNT = struct.Struct(">I")
_ENTRY_CRC = struct.Struct(">I")
_INCREMENT_ENTRY = {1: struct.Struct(">B3sIiQQQQQIQQQQ"), 2: struct.Struct(">B3sIiQQQQQIQQQQQQ")}


def decode_header_slot(data: bytes, *, offset: int = 0) -> ContainerHeader:
    """Decode one header slot's bytes (padding after its CRC allowed) into a header.

    Checks what the header says on its own (page size, blocks, increment table order); the
    checks against the file (sizes, ranges) are :class:`CheckpointFile`'s.
    """
    version, sequence, body = decode_slot_frame(data, offset=offset)
    return decode_header_body(version, sequence, body, offset=offset)


def decode_slot_frame(data: bytes, *, offset: int) -> tuple[int, int, bytes]:
    """(format version, sequence, body) of a header slot, or FormatError unless its CRC holds.

    The frame is the same in every format version, so this works on newer files too.
    """
    spec = load_spec()
    if data[: len(spec.MAGIC)] != spec.MAGIC:
        raise FormatError("not a pyvmm checkpoint header (bad magic)", offset=offset)
    slot = construct_call(lambda: spec.HeaderSlot.parse(data), "header slot", offset=offset)
    frame = slot.frame.value
    return int(frame.format_version), int(frame.sequence), bytes(frame.body)


def decode_header_body(version: int, sequence: int, body: bytes, *, offset: int) -> ContainerHeader:
    """The header a slot's body holds, checked (:func:`check_header`); VersionError for a
    version this pyvmm does not read. ``offset`` is the slot's, for messages."""
    spec = load_spec()
    if version > spec.FORMAT_VERSION:
        raise VersionError(
            f"checkpoint format version {version} is newer than this pyvmm reads "
            f"(up to {spec.FORMAT_VERSION}); use a newer pyvmm",
            offset=offset,
        )
    declaration = spec.HEADER_BODIES.get(version)
    if declaration is None:
        raise VersionError(f"unknown checkpoint format version {version}", offset=offset)
    body_offset = offset + spec.SLOT_FRAME_SIZE
    entry_size = spec.INCREMENT_ENTRY_SIZES[version]
    header = _decode_header_body_fast(version, sequence, body)
    if header is None:
        header = _decode_header_body_construct(version, sequence, body, offset=body_offset)
    entries_offset = body_offset + len(body) - len(header.increments) * entry_size
    check_header(header, offset=offset, entries_offset=entries_offset)
    return header


def _decode_header_body_construct(version: int, sequence: int, body: bytes, *,
                                  offset: int) -> ContainerHeader:
    """The header body by the format declaration: the reference, and the error messages
    (``offset``: the body's)."""
    declaration = load_spec().HEADER_BODIES[version]
    parsed = construct_call(lambda: declaration.parse(body), "header", offset=offset)
    increments = []
    for entry in parsed.increments:
        fields = entry.fields.value
        extra = {}
        if version >= 2:
            extra = {
                "checksum_offset": int(fields.checksum_offset),
                "checksum_length": int(fields.checksum_length),
            }
            fields = fields.v1
        increments.append(
            IncrementInfo(
                index=int(fields.index),
                kind=str(fields.kind),
                parent=int(fields.parent),
                created_ns=int(fields.created_ns),
                stream_offset=int(fields.stream_offset),
                stream_length=int(fields.stream_length),
                pages=int(fields.pages),
                zero_pages=int(fields.zero_pages),
                stream_crc=int(fields.stream_crc),
                index_offset=int(fields.index_offset),
                index_length=int(fields.index_length),
                stats_offset=int(fields.stats_offset),
                stats_length=int(fields.stats_length),
                **extra,
            )
        )
    header = ContainerHeader(
        format_version=version,
        page_size=int(parsed.page_size),
        vm_id=bytes(parsed.vm_id),
        machine=str(parsed.machine),
        ram_blocks=tuple(
            RamBlockInfo(str(b.name), int(b.gpa), int(b.size)) for b in parsed.ram_blocks
        ),
        capabilities=tuple(str(c) for c in parsed.capabilities),
        increments=tuple(increments),
        sequence=sequence,
    )
    return header


def _decode_header_body_fast(version: int, sequence: int, body: bytes) -> ContainerHeader | None:
    """The header :func:`_decode_header_body_construct` parses, with struct (construct took
    5 ms for a 16-increment chain, on every open: each reload, lazy start and verify), or
    ``None`` for anything it does not accept as it stands, which the declaration then names."""
    entry = _INCREMENT_ENTRY.get(version)
    if entry is None:
        return None
    spec = load_spec()
    kinds = {code: kind for kind, code in spec.INCREMENT_KINDS.items()}
    view = memoryview(body)
    at = 0

    def take(n: int) -> bytes:
        nonlocal at
        if n > len(body) - at:
            raise IndexError("body ends early")
        at += n
        return bytes(view[at - n:at])

    def name(encoding: str) -> str:
        return take(take(1)[0]).decode(encoding)

    try:
        (page_size,) = _U32.unpack(take(4))
        vm_id = take(16)
        machine = name("utf8")
        blocks = []
        for _ in range(_U16.unpack(take(2))[0]):
            block = name("utf8")
            gpa, size = _GPA_SIZE.unpack(take(16))
            blocks.append(RamBlockInfo(block, gpa, size))
        capabilities = tuple(name("ascii") for _ in range(take(1)[0]))
        (count,) = _COUNT.unpack(take(4))
        if len(body) - at != count * (entry.size + _ENTRY_CRC.size):
            return None
        increments = []
        for _ in range(count):
            fields = take(entry.size)
            if _ENTRY_CRC.unpack(take(_ENTRY_CRC.size))[0] != spec.crc32(fields):
                return None
            values = entry.unpack(fields)
            kind = kinds.get(values[0])
            if kind is None or values[1] != bytes(3):
                return None
            extra = {}
            if version >= 2:
                extra = {"checksum_offset": values[14], "checksum_length": values[15]}
            increments.append(IncrementInfo(
                index=values[2], kind=kind, parent=values[3], created_ns=values[4],
                stream_offset=values[5], stream_length=values[6], pages=values[7],
                zero_pages=values[8], stream_crc=values[9], index_offset=values[10],
                index_length=values[11], stats_offset=values[12], stats_length=values[13],
                **extra))
    except (IndexError, struct.error, UnicodeDecodeError):
        return None
    return ContainerHeader(format_version=version, page_size=page_size, vm_id=vm_id,
                           machine=machine, ram_blocks=tuple(blocks), capabilities=capabilities,
                           increments=tuple(increments), sequence=sequence)


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
        if len(records) % _PAGE_INDEX_RUN.size:
            raise ValueError(f"page index records are {_PAGE_INDEX_RUN.size} bytes each")
        self.records = bytes(records)

    def __len__(self) -> int:
        return len(self.records) // _PAGE_INDEX_RUN.size

    @staticmethod
    def _run(block: int, flags: int, _reserved: int, npages: int, first_page: int,
             data_offset: int) -> PageRun:
        return PageRun(block, first_page, npages, data_offset, bool(flags & _RUN_ZERO))

    def _item(self, index: int) -> PageRun:
        return self._run(*_PAGE_INDEX_RUN.unpack_from(self.records, index * _PAGE_INDEX_RUN.size))

    def __iter__(self) -> Iterator[PageRun]:
        run = self._run
        for fields in _PAGE_INDEX_RUN.iter_unpack(self.records):
            yield run(*fields)

    def pages(self) -> int:
        """Pages the runs list, data and zero."""
        return sum(self._npages())

    def data_counts(self) -> tuple[int, int]:
        """``(data runs, data pages)``: the runs and pages that are not zero runs."""
        flags = self.records[2::_PAGE_INDEX_RUN.size]  # each record's flags byte
        data = list(itertools.compress(self._npages(), [not f & _RUN_ZERO for f in flags]))
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


def encode_page_index(increment: int, runs: Sequence[PageRun]) -> bytes:
    """The page index blob of ``increment`` holding ``runs`` (in the given order)."""
    if isinstance(runs, IndexRecords):  # the records are the blob's body already
        spec = load_spec()
        body = _PAGE_INDEX_HEAD.pack(spec.PAGE_INDEX_MAGIC, increment, len(runs)) + runs.records
        return body + _PAGE_INDEX_CRC.pack(spec.crc32(body))
    fast = _encode_page_index_fast(increment, runs)
    if fast is not None:
        return fast
    return _encode_page_index_construct(increment, runs)


def _encode_page_index_fast(increment: int, runs: Sequence[PageRun]) -> bytes | None:
    """The blob :func:`_encode_page_index_construct` builds, with struct alone (construct's
    cost per run was most of an incremental checkpoint of scattered pages), or ``None`` for a
    value some field cannot hold: the construct builder then names it."""
    spec = load_spec()
    zero_flag: int = spec.RUN_ZERO
    pack = _PAGE_INDEX_RUN.pack
    try:
        body = b"".join([_PAGE_INDEX_HEAD.pack(spec.PAGE_INDEX_MAGIC, increment, len(runs)),
                         *[pack(run.block, zero_flag if run.zero else 0, 0, run.npages,
                                run.first_page, run.data_offset) for run in runs]])
    except struct.error:
        return None
    return body + _PAGE_INDEX_CRC.pack(spec.crc32(body))


def _encode_page_index_construct(increment: int, runs: Sequence[PageRun]) -> bytes:
    spec = load_spec()
    value = {
        "increment": increment,
        "runs": [
            {
                "block": run.block,
                "flags": spec.RUN_ZERO if run.zero else 0,
                "npages": run.npages,
                "first_page": run.first_page,
                "data_offset": run.data_offset,
            }
            for run in runs
        ],
    }
    return bytes(
        construct_call(
            lambda: spec.PageIndex.build({"fields": {"value": value}}),
            "page index",
            increment=increment,
        )
    )


#: A page index blob: magic, increment, run count, the runs, CRC (all big-endian; the same
#: layout as the declaration's PageIndex, which stays the reference: see _decode_page_index_fast).
_PAGE_INDEX_HEAD = struct.Struct(">4sII")
_PAGE_INDEX_RUN = struct.Struct(">HBBIQQ")
_PAGE_INDEX_CRC = struct.Struct(">I")
#: The index's flag of a zero run (the declaration's RUN_ZERO, which a test compares with it).
_RUN_ZERO = 0x01


def decode_page_index(data: bytes, *, increment: int, offset: int | None = None) -> list[PageRun]:
    """The runs of a page index blob that must belong to ``increment`` (checked with its CRC)."""
    runs = _decode_page_index_fast(data, increment)
    if runs is not None:
        return runs
    return _decode_page_index_construct(data, increment=increment, offset=offset)


def page_index_head_size() -> int:
    """Bytes of a page index blob that say how long it must be (magic, increment, run count)."""
    return _PAGE_INDEX_HEAD.size


def page_index_head_problem(head: bytes, increment: int, length: int) -> str | None:
    """What is wrong with the first bytes of a page index blob of ``length`` bytes said to
    belong to ``increment``, or ``None`` when they agree (the rest is checked once read)."""
    if len(head) < _PAGE_INDEX_HEAD.size:
        return f"{length} bytes are too few for a page index"
    magic, owner, count = _PAGE_INDEX_HEAD.unpack_from(head)
    if magic != load_spec().PAGE_INDEX_MAGIC:
        return "bad magic"
    if owner != increment:
        return f"belongs to increment {owner}, not {increment}"
    expected = _PAGE_INDEX_HEAD.size + count * _PAGE_INDEX_RUN.size + _PAGE_INDEX_CRC.size
    if expected != length:
        return f"{count} runs take {expected} bytes, the header says {length}"
    return None


def page_index_records(data: bytes, increment: int) -> memoryview | None:
    """The raw run records of a page index blob of ``increment`` whose magic, length and CRC
    hold (for C code that checks each record itself), else ``None``: then
    :func:`decode_page_index` names what is wrong."""
    spec = load_spec()
    size = len(data)
    head = _PAGE_INDEX_HEAD.size
    if size < head + _PAGE_INDEX_CRC.size:
        return None
    magic, owner, count = _PAGE_INDEX_HEAD.unpack_from(data)
    body_end = size - _PAGE_INDEX_CRC.size
    if magic != spec.PAGE_INDEX_MAGIC or owner != increment or \
            head + count * _PAGE_INDEX_RUN.size != body_end:
        return None
    view = memoryview(data)
    if spec.crc32(view[:body_end]) != _PAGE_INDEX_CRC.unpack_from(data, body_end)[0]:
        return None
    return view[head:body_end]


def _decode_page_index_fast(data: bytes, increment: int) -> list[PageRun] | None:
    """The runs of a well-formed page index blob of ``increment`` with struct alone (an index
    may hold a run per guest page: construct's per-run cost dominated a chain's reload), or
    ``None`` for any blob it does not accept, which the construct parser then decodes or
    rejects with its one-line error.  Accepts exactly what that parser accepts and the checks
    after it pass: magic, length for the run count, CRC, zero reserved byte, known flags."""
    spec = load_spec()
    size = len(data)
    head, run_size = _PAGE_INDEX_HEAD.size, _PAGE_INDEX_RUN.size
    if size < head + _PAGE_INDEX_CRC.size:
        return None
    magic, owner, count = _PAGE_INDEX_HEAD.unpack_from(data)
    body_end = size - _PAGE_INDEX_CRC.size
    if magic != spec.PAGE_INDEX_MAGIC or owner != increment or head + count * run_size != body_end:
        return None
    view = memoryview(data)
    if spec.crc32(view[:body_end]) != _PAGE_INDEX_CRC.unpack_from(data, body_end)[0]:
        return None
    known: int = spec.RUN_FLAGS
    zero_flag: int = spec.RUN_ZERO
    runs = []
    for block, flags, reserved, npages, first_page, data_offset in _PAGE_INDEX_RUN.iter_unpack(
        view[head:body_end]
    ):
        if reserved or flags & ~known:
            return None
        runs.append(PageRun(block, first_page, npages, data_offset, bool(flags & zero_flag)))
    return runs


def _decode_page_index_construct(
    data: bytes, *, increment: int, offset: int | None = None
) -> list[PageRun]:
    """decode_page_index by the format declaration: the reference, and the error messages."""
    spec = load_spec()
    parsed = construct_call(
        lambda: spec.PageIndex.parse(data), "page index", offset=offset, increment=increment
    )
    fields = parsed.fields.value
    if fields.increment != increment:
        raise FormatError(
            f"page index belongs to increment {fields.increment}",
            offset=offset,
            increment=increment,
        )
    known: int = spec.RUN_FLAGS
    zero_flag: int = spec.RUN_ZERO
    runs = []
    # item access, not construct's slow attribute access: an index may hold a run per page
    for raw in fields["runs"]:
        flags = raw["flags"]
        if flags & ~known:
            raise FormatError(
                f"page run has unknown flags 0x{flags:x}", offset=offset, increment=increment
            )
        runs.append(
            PageRun(
                raw["block"],
                raw["first_page"],
                raw["npages"],
                raw["data_offset"],
                bool(flags & zero_flag),
            )
        )
    return runs


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
            f"stats are not valid JSON: {_one_line(err)}", offset=offset, increment=increment
        ) from err
    if not isinstance(stats, dict):
        raise FormatError("stats are not a JSON object", offset=offset, increment=increment)
    return stats


# ----- checks ----------------------------------------------------------------------------------


def check_header(
    header: ContainerHeader, *, offset: int | None = None, entries_offset: int | None = None
) -> None:
    """Raise FormatError unless ``header`` is self-consistent (without looking at a file).

    ``entries_offset`` is where the increment table starts in the file, to locate errors.
    """
    spec = load_spec()
    page_size = header.page_size
    if not MIN_PAGE_SIZE <= page_size <= MAX_PAGE_SIZE or page_size & (page_size - 1):
        raise FormatError(
            f"page size {page_size} is not a power of two in {MIN_PAGE_SIZE}..{MAX_PAGE_SIZE}",
            offset=offset,
        )
    if len(header.vm_id) != 16:
        raise FormatError(f"VM id is {len(header.vm_id)} bytes, not 16", offset=offset)
    if len(header.machine.encode()) > MAX_NAME:
        raise FormatError(f"machine name is longer than {MAX_NAME} bytes", offset=offset)
    _check_ram_blocks(header.ram_blocks, page_size, offset=offset)
    check_capabilities(header.capabilities, offset=offset)
    total_pages = header.total_pages
    max_index_length = spec.PAGE_INDEX_OVERHEAD + total_pages * spec.PAGE_RUN_SIZE
    # a CRC per data page and per gap (data runs + 1)
    max_checksum_length = (spec.CHECKSUM_OVERHEAD + (2 * total_pages + 1) * 4
                           + spec.MAX_DEVICE_SECTIONS * spec.DEVICE_SECTION_MAX_SIZE)
    previous_end = spec.DATA_START
    for number, info in enumerate(header.increments):
        where: dict[str, Any] = {"increment": number}
        if entries_offset is not None:
            where["offset"] = entries_offset + number * spec.INCREMENT_ENTRY_SIZES.get(
                header.format_version, spec.INCREMENT_ENTRY_SIZE
            )

        def bad(message: str) -> FormatError:
            return FormatError(f"increment table: {message}", **where)  # noqa: B023

        if info.index != number:
            raise bad(f"entry {number} says it is increment {info.index}")
        if info.kind not in KINDS:
            raise bad(f"unknown kind {info.kind!r}")
        if info.kind == "full" and info.parent != -1:
            raise bad(f"a full increment has parent {info.parent}")
        if info.kind == "incremental" and not 0 <= info.parent < number:
            raise bad(f"an incremental increment has parent {info.parent}")
        if info.stream_offset < previous_end or info.stream_offset % spec.STREAM_ALIGN:
            raise bad(
                f"stream offset 0x{info.stream_offset:x} is not aligned past the previous data "
                f"(0x{previous_end:x})"
            )
        if info.index_offset != info.stream_offset + info.stream_length:
            raise bad("page index does not follow the stream")
        if not spec.PAGE_INDEX_OVERHEAD <= info.index_length <= max_index_length or (
            (info.index_length - spec.PAGE_INDEX_OVERHEAD) % spec.PAGE_RUN_SIZE
        ):
            raise bad(f"page index length {info.index_length} is impossible")
        if info.stats_length or info.stats_offset:
            if info.stats_offset != info.index_offset + info.index_length:
                raise bad("stats do not follow the page index")
            max_stats = spec.STATS_OVERHEAD + MAX_STATS_BYTES
            if not spec.STATS_OVERHEAD <= info.stats_length <= max_stats:
                raise bad(f"stats length {info.stats_length} is impossible")
        if info.checksum_length or info.checksum_offset:
            if header.format_version < 2:
                raise bad("a format 1 increment has a checksum block")
            before = info.stats_offset + info.stats_length if info.stats_length else (
                info.index_offset + info.index_length
            )
            if info.checksum_offset != before:
                raise bad("the checksum block does not follow the stats or page index")
            if not spec.CHECKSUM_OVERHEAD <= info.checksum_length <= max_checksum_length:
                raise bad(f"checksum block length {info.checksum_length} is impossible")
        if info.pages + info.zero_pages > total_pages:
            raise bad(f"{info.pages} + {info.zero_pages} pages exceed the {total_pages} of RAM")
        previous_end = info.end


def _check_ram_blocks(
    blocks: Sequence[RamBlockInfo], page_size: int, *, offset: int | None
) -> None:
    names: set[str] = set()
    spans = []
    for number, block in enumerate(blocks):
        what = f"RAM block {number} ({block.name!r})"
        if not block.name or len(block.name.encode()) > MAX_NAME:
            raise FormatError(f"{what}: name must have 1..{MAX_NAME} bytes", offset=offset)
        if block.name in names:
            raise FormatError(f"{what}: name appears twice", offset=offset)
        names.add(block.name)
        if block.size <= 0 or block.size % page_size or block.gpa % page_size:
            raise FormatError(
                f"{what}: address 0x{block.gpa:x} and size 0x{block.size:x} must be positive "
                f"multiples of the page size",
                offset=offset,
            )
        if block.gpa < 0 or block.gpa + block.size > 1 << 64:
            raise FormatError(f"{what}: lies outside the 64-bit address space", offset=offset)
        spans.append((block.gpa, block.gpa + block.size, what))
    total = sum(block.size for block in blocks)
    if total > MAX_GUEST_RAM:
        raise FormatError(
            f"the RAM blocks add up to {total} bytes, more than the {MAX_GUEST_RAM} bytes "
            f"({MAX_GUEST_RAM >> 30} GiB) of the largest machine pyvmm builds",
            offset=offset,
        )
    spans.sort()
    for (_, end, what), (start, _, other) in itertools.pairwise(spans):
        if start < end:
            raise FormatError(f"{what} overlaps {other}", offset=offset)


def check_capabilities(capabilities: Sequence[str], *, offset: int | None = None) -> None:
    """Raise FormatError unless the capability names are distinct short ``[A-Za-z0-9._-]`` words."""
    if len(set(capabilities)) != len(capabilities):
        raise FormatError("a capability appears twice", offset=offset)
    if len(capabilities) > 255:
        raise FormatError("more than 255 capabilities", offset=offset)
    for name in capabilities:
        ok = 0 < len(name) <= MAX_CAPABILITY and all(
            ch.isascii() and (ch.isalnum() or ch in "-_.") for ch in name
        )
        if not ok:
            raise FormatError(
                f"capability {name!r} is not 1..{MAX_CAPABILITY} of [A-Za-z0-9._-]", offset=offset
            )


def check_page_runs(
    header: ContainerHeader, info: IncrementInfo, runs: Sequence[PageRun]
) -> None:
    """Raise FormatError unless ``runs`` can be ``info``'s page index in a file with ``header``.

    Every run lies inside its RAM block, data runs inside the increment's stream, no page is
    listed twice, and the page counts match ``info.pages`` / ``info.zero_pages``.
    """
    page_size = header.page_size
    stride = PAGE_RECORD_HEADER + page_size
    stream_end = info.stream_offset + info.stream_length
    pages = zero_pages = 0
    nblocks = len(header.ram_blocks)
    block_sizes = [b.size // page_size for b in header.ram_blocks]
    stream_offset = info.stream_offset
    number = 0

    def bad(message: str) -> FormatError:
        return FormatError(f"page run {number}: {message}", increment=info.index)

    for number, run in enumerate(runs):
        # one run per guest page is possible: the sound case first, in as few steps as can be
        block = run.block
        if 0 <= block < nblocks and run.npages >= 1 and run.first_page >= 0 and (
            run.first_page + run.npages <= block_sizes[block]
        ):
            if run.zero:
                if not run.data_offset:
                    zero_pages += run.npages
                    continue
            elif (
                run.data_offset >= stream_offset
                and run.data_offset + (run.npages - 1) * stride + page_size <= stream_end
            ):
                pages += run.npages
                continue
        if not 0 <= run.block < len(header.ram_blocks):
            raise bad(f"RAM block {run.block} does not exist")
        block_pages = header.ram_blocks[run.block].size // page_size
        if run.npages < 1 or run.first_page < 0 or run.first_page + run.npages > block_pages:
            raise bad(
                f"pages {run.first_page}+{run.npages} lie outside RAM block {run.block} "
                f"({block_pages} pages)"
            )
        if run.zero:
            if run.data_offset:
                raise bad("a zero run has a data offset")
            zero_pages += run.npages
        else:
            last_end = run.data_offset + (run.npages - 1) * stride + page_size
            if run.data_offset < info.stream_offset or last_end > stream_end:
                raise bad(
                    f"data 0x{run.data_offset:x}..0x{last_end:x} lies outside the stream "
                    f"0x{info.stream_offset:x}..0x{stream_end:x}"
                )
            pages += run.npages
    spans = sorted((run.block, run.first_page, run.npages) for run in runs)
    for (block, first, count), (next_block, next_first, _) in itertools.pairwise(spans):
        if block == next_block and next_first < first + count:
            raise FormatError(
                f"page {next_first} of RAM block {block} is listed twice", increment=info.index
            )
    if (pages, zero_pages) != (info.pages, info.zero_pages):
        raise FormatError(
            f"page index holds {pages} data and {zero_pages} zero pages, the header says "
            f"{info.pages} and {info.zero_pages}",
            increment=info.index,
        )
