"""The pyvmm checkpoint container format, declared once with ``construct`` to parse and build.

This file is data, not an importable module (its name holds a dot on purpose): it is loaded by
``pyvmm.migration.container_format.load_spec()``, which also owns every check this declaration
cannot express (ranges lying inside the file, page runs inside RAM blocks...) and turns
construct's errors into :class:`pyvmm.errors.FormatError`. It imports nothing from pyvmm.

Layout of a file (every integer big-endian; offsets are absolute file offsets)::

    0x00000  header slot 0   SLOT_SIZE bytes: a HeaderSlot, zero padded
    0x10000  header slot 1   SLOT_SIZE bytes: a HeaderSlot, zero padded
    0x20000  DATA_START: the increments, in order, each:
               stream      QEMU v3 migration stream (written by the caller), 4 KiB aligned start
               page index  PageIndex, right after the stream
               stats       StatsBlob, right after the page index (absent when empty)

The two slots make header updates crash-safe: an append writes its data, syncs, then writes the
new header (sequence + 1) over the *older* slot and syncs again. A reader takes the slot with the
highest sequence among those whose CRC holds, so a torn header write only loses the increment
that was being added.

The slot frame (magic, byte-order mark, format version, length, sequence, trailing CRC) is frozen
for every format version, so that any pyvmm can tell "newer version" from "damaged"; only the
body behind it (HEADER_BODIES) changes with the version.

Checksums are CRC-32 (zlib's, ISO-HDLC polynomial). An increment's ``stream_crc`` is different: a
CRC-32C of its stream computed by the writer, or 0 for none; the container stores it as given.
"""

import zlib

from construct import (
    Bytes,
    Check,
    Checksum,
    Const,
    GreedyBytes,
    Int8ub,
    Int16ub,
    Int32sb,
    Int32ub,
    Int64ub,
    Mapping,
    PascalString,
    Prefixed,
    PrefixedArray,
    RawCopy,
    Rebuild,
    Struct,
    Terminated,
    this,
)

MAGIC = b"PYVMMCPT"
FORMAT_VERSION = 1
BYTE_ORDER_MARK = 0x01020304  # reads 0x04030201 if someone writes the fields little-endian
SLOT_SIZE = 64 * 1024
SLOT_COUNT = 2
DATA_START = SLOT_COUNT * SLOT_SIZE
STREAM_ALIGN = 4096

PAGE_INDEX_MAGIC = b"PGIX"
STATS_MAGIC = b"STAT"
RUN_ZERO = 0x01  # PageRun.flags: the run's pages are all zero and have no data in the file
RUN_FLAGS = RUN_ZERO  # every flag bit this version knows; others must be clear


def crc32(data: bytes) -> int:
    """The container's checksum over ``data``."""
    return zlib.crc32(data) & 0xFFFFFFFF


# ----- header slot -----------------------------------------------------------------------------

SLOT_FRAME_SIZE = 8 + 4 + 4 + 4 + 8  # magic, byte order, version, length, sequence
SLOT_OVERHEAD = SLOT_FRAME_SIZE + 4  # ... plus the trailing CRC

SlotFrame = Struct(
    "magic" / Const(MAGIC),
    "byte_order" / Const(BYTE_ORDER_MARK, Int32ub),
    "format_version" / Int32ub,
    # bytes of this slot in use, from the magic through the CRC
    "length" / Rebuild(Int32ub, lambda ctx: len(ctx.body) + SLOT_OVERHEAD),
    Check(lambda ctx: SLOT_OVERHEAD <= ctx.length <= SLOT_SIZE),
    "sequence" / Int64ub,
    "body" / Bytes(this.length - SLOT_OVERHEAD),
)

HeaderSlot = Struct(
    "frame" / RawCopy(SlotFrame),
    "crc" / Checksum(Int32ub, crc32, this.frame.data),
)
"""One header slot: parse from the slot's SLOT_SIZE bytes (padding after the CRC is ignored)."""

# ----- header body, version 1 ------------------------------------------------------------------

RamBlock = Struct(
    "name" / PascalString(Int8ub, "utf8"),  # QEMU idstr: at most 255 bytes on the wire too
    "gpa" / Int64ub,
    "size" / Int64ub,
)

INCREMENT_KINDS = {"full": 0, "incremental": 1}

IncrementFields = Struct(
    "kind" / Mapping(Int8ub, INCREMENT_KINDS),
    "reserved" / Const(bytes(3)),
    "index" / Int32ub,
    "parent" / Int32sb,  # -1 for a full increment
    "created_ns" / Int64ub,  # wall clock, ns since the epoch
    "stream_offset" / Int64ub,
    "stream_length" / Int64ub,
    "pages" / Int64ub,  # pages with data in the stream
    "zero_pages" / Int64ub,  # pages sent as zero (no data)
    "stream_crc" / Int32ub,  # CRC-32C of the stream, 0 = not computed
    "index_offset" / Int64ub,
    "index_length" / Int64ub,
    "stats_offset" / Int64ub,  # 0 with length 0: no stats
    "stats_length" / Int64ub,
)

IncrementEntry = Struct(
    "fields" / RawCopy(IncrementFields),
    # per entry, so that one entry can be checked (and reported) on its own
    "crc" / Checksum(Int32ub, crc32, this.fields.data),
)
INCREMENT_ENTRY_SIZE = IncrementEntry.sizeof()

HeaderBodyV1 = Struct(
    "page_size" / Int32ub,
    "vm_id" / Bytes(16),
    "machine" / PascalString(Int8ub, "utf8"),
    "ram_blocks" / PrefixedArray(Int16ub, RamBlock),
    "capabilities" / PrefixedArray(Int8ub, PascalString(Int8ub, "ascii")),
    "increments" / PrefixedArray(Int32ub, IncrementEntry),
    Terminated,
)

HEADER_BODIES = {1: HeaderBodyV1}
"""Body declaration for each format version this pyvmm reads (and writes: FORMAT_VERSION)."""

# ----- page index ------------------------------------------------------------------------------

PageRun = Struct(
    "block" / Int16ub,  # number in the header's ram_blocks
    "flags" / Int8ub,  # RUN_ZERO
    "reserved" / Const(b"\x00"),
    "npages" / Int32ub,
    "first_page" / Int64ub,  # page number inside the block
    # file offset of the first page's data bytes; page k of the run is at
    # data_offset + k * (8 + page_size) (8 = the page record header in the stream); 0 for zero runs
    "data_offset" / Int64ub,
)
PAGE_RUN_SIZE = PageRun.sizeof()

# an index holds up to one run per guest page; the compiled array parses about 4x faster
PageRuns = PrefixedArray(Int32ub, PageRun).compile()

PageIndexFields = Struct(
    "magic" / Const(PAGE_INDEX_MAGIC),
    "increment" / Int32ub,
    "runs" / PageRuns,
)

PageIndex = Struct(
    "fields" / RawCopy(PageIndexFields),
    "crc" / Checksum(Int32ub, crc32, this.fields.data),
    Terminated,
)
PAGE_INDEX_OVERHEAD = 4 + 4 + 4 + 4  # magic, increment, run count, CRC

# ----- stats -----------------------------------------------------------------------------------

StatsFields = Struct(
    "magic" / Const(STATS_MAGIC),
    "increment" / Int32ub,
    "json" / Prefixed(Int32ub, GreedyBytes),  # UTF-8 JSON object, free-form, written by the caller
)

StatsBlob = Struct(
    "fields" / RawCopy(StatsFields),
    "crc" / Checksum(Int32ub, crc32, this.fields.data),
    Terminated,
)
STATS_OVERHEAD = 4 + 4 + 4 + 4  # magic, increment, JSON length, CRC

__all__ = [
    "BYTE_ORDER_MARK",
    "DATA_START",
    "FORMAT_VERSION",
    "HEADER_BODIES",
    "HeaderBodyV1",
    "HeaderSlot",
    "INCREMENT_ENTRY_SIZE",
    "INCREMENT_KINDS",
    "IncrementEntry",
    "IncrementFields",
    "MAGIC",
    "PAGE_INDEX_MAGIC",
    "PAGE_INDEX_OVERHEAD",
    "PAGE_RUN_SIZE",
    "PageIndex",
    "PageIndexFields",
    "PageRun",
    "PageRuns",
    "RUN_FLAGS",
    "RUN_ZERO",
    "RamBlock",
    "SLOT_COUNT",
    "SLOT_FRAME_SIZE",
    "SLOT_OVERHEAD",
    "SLOT_SIZE",
    "STATS_MAGIC",
    "STATS_OVERHEAD",
    "STREAM_ALIGN",
    "StatsBlob",
    "StatsFields",
    "crc32",
]
