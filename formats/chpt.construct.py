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
               checksums   ChecksumBlob, right after the stats, else the page index (format 2;
                           absent when the writer computed none)

The two slots make header updates crash-safe: an append writes its data, syncs, then writes the
new header (sequence + 1) over the *older* slot and syncs again. A reader takes the slot with the
highest sequence among those whose CRC holds, so a torn header write only loses the increment
that was being added.

The slot frame (magic, byte-order mark, format version, length, sequence, trailing CRC) is frozen
for every format version, so that any pyvmm can tell "newer version" from "damaged"; only the
body behind it (HEADER_BODIES) changes with the version.

Checksums are CRC-32 (zlib's, ISO-HDLC polynomial). An increment's ``stream_crc`` is different: a
CRC-32C of its stream computed by the writer, or 0 for none; the container stores it as given.

Compressed page records (the ``compress`` capability, page encoder ``zstd``): beside QEMU's
RAM records (ZERO 0x02, PAGE 0x08, CONTINUE 0x20...) an increment's stream may hold pyvmm's own::

    be64   page_offset | 0x400 [| 0x20 CONTINUE]
    u8 len, idstr      (only without CONTINUE, as in every QEMU RAM record)
    be16   n           1 <= n <= 3072
    n bytes            one zstd frame (with its content checksum, without the content
                       size) inflating to exactly page_size bytes

QEMU's flags end at 0x200 and its own compressed page (0x100) is zlib and deprecated, so the
record has a flag of its own; the frame's checksum finds damage to it as it is inflated; a page that does not shrink to 3072 bytes is written as PAGE, a
zero page as ZERO. QEMU cannot load a stream that holds one (its analyzer stops at the flag); a
stream without one is QEMU's as before. The page index lists consecutive compressed records of
consecutive pages as one run flagged RUN_COMPRESSED. Older pyvmm versions refuse the flag.

Format 2 adds the checksum block (``ChecksumBlob``, the ``checksum`` capability) and its place in
the increment entry; format 1 files are still read, and appended to in format 1. The checksum
block's own values are CRC-32C (Castagnoli, the SSE4.2 instruction's), over the stream as follows:

* ``page_crcs``: one per data page of the increment, in page-index order (runs as listed, pages
  of a run in order): the CRC-32C of the page's ``page_size`` data bytes.
* ``gap_crcs``: the stream cut at every data run's *extent* (its first page's data to its last
  page's data end; the record headers inside an extent are fixed by the run and are compared
  exactly instead). With the data runs sorted by file offset, gap ``i`` is the bytes before run
  ``i`` (from the stream start or the previous extent's end) and the last gap the bytes after the
  last extent, up to the stream end (the device sections live there). One CRC-32C per gap, so
  damage is located to a byte range: data runs + 1 gaps.
* ``sections``: each device section of the stream (a FULL section, header to the next one's
  header; the last one to the end of the device state) with its idstr, instance, absolute file
  offset, length and CRC-32C. They lie inside the last gap and repeat part of its coverage, to
  name the device whose bytes are damaged.
* ``ram_digest``: the CRC-32C of the whole guest RAM at the pause, as a table of per-page CRCs:
  for every RAM block in header order, every page in order, its CRC-32C as a little-endian u32
  (a page never saved counts as a zero page); the digest is the CRC-32C of that table's bytes.
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
FORMAT_VERSION = 2
BYTE_ORDER_MARK = 0x01020304  # reads 0x04030201 if someone writes the fields little-endian
SLOT_SIZE = 64 * 1024
SLOT_COUNT = 2
DATA_START = SLOT_COUNT * SLOT_SIZE
STREAM_ALIGN = 4096

PAGE_INDEX_MAGIC = b"PGIX"
STATS_MAGIC = b"STAT"
CHECKSUM_MAGIC = b"CSUM"
CHECKSUM_ALGORITHMS = {"crc32c": 1}
RUN_ZERO = 0x01  # PageRun.flags: the run's pages are all zero and have no data in the file
# PageRun.flags: the run's pages are pyvmm's compressed page records (the compress capability)
RUN_COMPRESSED = 0x02
RUN_FLAGS = RUN_ZERO | RUN_COMPRESSED  # every flag bit this version knows; others must be clear
# (and never both: a run is data, zero or compressed)


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
INCREMENT_ENTRY_SIZE = IncrementEntry.sizeof()  # format 1

HeaderBodyV1 = Struct(
    "page_size" / Int32ub,
    "vm_id" / Bytes(16),
    "machine" / PascalString(Int8ub, "utf8"),
    "ram_blocks" / PrefixedArray(Int16ub, RamBlock),
    "capabilities" / PrefixedArray(Int8ub, PascalString(Int8ub, "ascii")),
    "increments" / PrefixedArray(Int32ub, IncrementEntry),
    Terminated,
)

# ----- header body, version 2: the increment entry locates the checksum block -------------------

IncrementFieldsV2 = Struct(
    "v1" / IncrementFields,
    "checksum_offset" / Int64ub,  # 0 with length 0: no checksum block
    "checksum_length" / Int64ub,
)

IncrementEntryV2 = Struct(
    "fields" / RawCopy(IncrementFieldsV2),
    "crc" / Checksum(Int32ub, crc32, this.fields.data),
)

HeaderBodyV2 = Struct(
    "page_size" / Int32ub,
    "vm_id" / Bytes(16),
    "machine" / PascalString(Int8ub, "utf8"),
    "ram_blocks" / PrefixedArray(Int16ub, RamBlock),
    "capabilities" / PrefixedArray(Int8ub, PascalString(Int8ub, "ascii")),
    "increments" / PrefixedArray(Int32ub, IncrementEntryV2),
    Terminated,
)

HEADER_BODIES = {1: HeaderBodyV1, 2: HeaderBodyV2}
"""Body declaration for each format version this pyvmm reads (and writes: FORMAT_VERSION for new
files, the file's own version when appending)."""
INCREMENT_ENTRY_SIZES = {1: INCREMENT_ENTRY_SIZE, 2: IncrementEntryV2.sizeof()}

# ----- page index ------------------------------------------------------------------------------

PageRun = Struct(
    "block" / Int16ub,  # number in the header's ram_blocks
    "flags" / Int8ub,  # RUN_ZERO or RUN_COMPRESSED (not both), or none: a data run
    "reserved" / Const(b"\x00"),
    "npages" / Int32ub,
    "first_page" / Int64ub,  # page number inside the block
    # file offset of the first page's data bytes; page k of the run is at
    # data_offset + k * (8 + page_size) (8 = the page record header in the stream); 0 for zero
    # runs. A compressed run: the file offset of its first record's be16 length (see the module
    # docstring); the run's records follow one another, so it is read whole.
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

# ----- checksum block (format 2) ---------------------------------------------------------------

DeviceSection = Struct(
    "name" / PascalString(Int8ub, "utf8"),  # the section's idstr
    "instance_id" / Int32ub,
    "offset" / Int64ub,  # absolute file offset of the section header
    "length" / Int32ub,
    "crc" / Int32ub,
)
MAX_DEVICE_SECTIONS = 1024
DEVICE_SECTION_MAX_SIZE = 1 + 255 + 4 + 8 + 4 + 4

ChecksumFields = Struct(
    "magic" / Const(CHECKSUM_MAGIC),
    "increment" / Int32ub,
    "algorithm" / Mapping(Int8ub, CHECKSUM_ALGORITHMS),
    "reserved" / Const(bytes(3)),
    "ram_digest" / Int32ub,  # CRC-32C of the RAM's per-page CRC table at the pause
    "page_count" / Int32ub,
    "page_crcs" / Bytes(this.page_count * 4),  # big-endian u32 each, page-index order
    "gap_count" / Int32ub,
    "gap_crcs" / Bytes(this.gap_count * 4),  # big-endian u32 each, file order
    "sections" / PrefixedArray(Int16ub, DeviceSection),
)

ChecksumBlob = Struct(
    "fields" / RawCopy(ChecksumFields),
    "crc" / Checksum(Int32ub, crc32, this.fields.data),
    Terminated,
)
CHECKSUM_OVERHEAD = 4 + 4 + 1 + 3 + 4 + 4 + 4 + 2 + 4  # every fixed field and the CRC

__all__ = [
    "BYTE_ORDER_MARK",
    "CHECKSUM_ALGORITHMS",
    "CHECKSUM_MAGIC",
    "CHECKSUM_OVERHEAD",
    "ChecksumBlob",
    "ChecksumFields",
    "DEVICE_SECTION_MAX_SIZE",
    "DeviceSection",
    "MAX_DEVICE_SECTIONS",
    "HeaderBodyV2",
    "INCREMENT_ENTRY_SIZES",
    "IncrementEntryV2",
    "IncrementFieldsV2",
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
    "RUN_COMPRESSED",
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
