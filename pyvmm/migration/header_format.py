"""The container's header slots: encoded, decoded and checked.

The checks are those a declaration cannot express: page sizes, RAM blocks that do not overlap,
an increment table whose pieces follow each other in the file. Each slot is built and parsed by
the declaration in ``formats/chpt.construct.py`` (the reference, and the error messages) or, for
the common case, by struct with the same bytes (construct's cost grew with the chain); a property
test holds the two equal. Decoders take bytes that may be hostile and answer with a
:class:`~pyvmm.migration.container_format.ContainerHeader` or a
:class:`~pyvmm.errors.FormatError`, nothing else. No I/O.
"""

from __future__ import annotations

import functools
import itertools
import struct
from collections.abc import Sequence
from typing import Any

from pyvmm.errors import FormatError, VersionError
from pyvmm.migration.container_format import (
    KINDS,
    MAX_CAPABILITY,
    MAX_GUEST_RAM,
    MAX_NAME,
    MAX_PAGE_SIZE,
    MAX_STATS_BYTES,
    MIN_PAGE_SIZE,
    ContainerHeader,
    IncrementInfo,
    RamBlockInfo,
    construct_call,
    load_spec,
)

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

