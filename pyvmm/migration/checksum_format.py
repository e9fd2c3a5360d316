"""The checksum block of a format-2 checkpoint increment (``checksum`` capability): its value
type, and its encoding, decoding and checks against the increment it belongs to.

The bytes are declared in ``formats/chpt.construct.py`` (``ChecksumBlob``, with what each CRC
covers); like :mod:`pyvmm.migration.container_format`, whose loader and error mapping it uses,
this module does no I/O and answers hostile bytes with a value or a FormatError.
"""

from __future__ import annotations

import array
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from pyvmm.errors import FormatError
from pyvmm.migration.container_format import (
    IncrementInfo,
    IndexRecords,
    PageRun,
    construct_call,
    load_spec,
)


@dataclass(frozen=True)
class ChecksumBlock:
    """An increment's checksum block (format 2, ``checksum`` capability): CRC-32C values as
    ``array('I')`` in host order. See the declaration's docstring for what each covers.

    ``page_crcs``: one per data page in page-index order; ``gap_crcs``: one per stream gap in
    file order (data runs + 1); ``ram_digest``: CRC-32C of the whole RAM's per-page CRC table;
    ``sections``: the device sections, to name a damaged one.
    """

    algorithm: str
    ram_digest: int
    page_crcs: array.array[int]
    gap_crcs: array.array[int]
    sections: tuple[DeviceSectionCrc, ...] = ()


@dataclass(frozen=True)
class DeviceSectionCrc:
    """One device section of a stream: idstr, instance, absolute file offset, length, CRC-32C."""

    name: str
    instance_id: int
    offset: int
    length: int
    crc: int


def _be_u32s(values: array.array[int]) -> bytes:
    out = array.array("I", values)
    if sys.byteorder == "little":
        out.byteswap()
    return out.tobytes()


def _u32s_from_be(data: bytes) -> array.array[int]:
    out = array.array("I")
    out.frombytes(data)
    if sys.byteorder == "little":
        out.byteswap()
    return out


def encode_checksums(increment: int, block: ChecksumBlock) -> bytes:
    """The checksum block of ``increment``."""
    spec = load_spec()
    value = {
        "increment": increment,
        "algorithm": block.algorithm,
        "ram_digest": block.ram_digest,
        "page_count": len(block.page_crcs),
        "page_crcs": _be_u32s(block.page_crcs),
        "gap_count": len(block.gap_crcs),
        "gap_crcs": _be_u32s(block.gap_crcs),
        "sections": [
            {"name": d.name, "instance_id": d.instance_id, "offset": d.offset,
             "length": d.length, "crc": d.crc}
            for d in block.sections
        ],
    }
    if len(block.sections) > spec.MAX_DEVICE_SECTIONS:
        raise ValueError(f"{len(block.sections)} device sections: at most "
                         f"{spec.MAX_DEVICE_SECTIONS} fit")
    return bytes(
        construct_call(
            lambda: spec.ChecksumBlob.build({"fields": {"value": value}}),
            "checksum block",
            increment=increment,
        )
    )


def decode_checksums(
    data: bytes, *, increment: int, offset: int | None = None
) -> ChecksumBlock:
    """The checksum block of ``increment`` (its CRC checked); FormatError/ChecksumError else."""
    fast = _decode_checksums_fast(data, increment)
    if fast is not None:
        return fast
    spec = load_spec()
    parsed = construct_call(
        lambda: spec.ChecksumBlob.parse(data), "checksum block", offset=offset, increment=increment
    )
    fields = parsed.fields.value
    if fields.increment != increment:
        raise FormatError(
            f"checksum block belongs to increment {fields.increment}",
            offset=offset,
            increment=increment,
        )
    return ChecksumBlock(
        algorithm=str(fields.algorithm),
        ram_digest=int(fields.ram_digest),
        page_crcs=_u32s_from_be(bytes(fields.page_crcs)),
        gap_crcs=_u32s_from_be(bytes(fields.gap_crcs)),
        sections=tuple(
            DeviceSectionCrc(str(d.name), int(d.instance_id), int(d.offset), int(d.length),
                             int(d.crc))
            for d in fields.sections
        ),
    )


_HEAD = struct.Struct(">4sIB3sII")  # magic, increment, algorithm, reserved, digest, page count
_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")
_SECTION_TAIL = struct.Struct(">IQII")  # instance, offset, length, CRC after the name


def _decode_checksums_fast(data: bytes, increment: int) -> ChecksumBlock | None:
    """:func:`decode_checksums` with struct alone (construct's per-field cost is most of a
    chain's checked reload), or ``None`` for any blob it does not accept, which the construct
    parser then decodes or rejects with its one-line error. Accepts exactly what that parser
    and the increment check after it accept."""
    spec = load_spec()
    size = len(data)
    try:
        magic, owner, algorithm, reserved, digest, page_count = _HEAD.unpack_from(data)
        at = _HEAD.size
        page_bytes = data[at:at + 4 * page_count]
        at += 4 * page_count
        (gap_count,) = _U32.unpack_from(data, at)
        at += 4
        gap_bytes = data[at:at + 4 * gap_count]
        at += 4 * gap_count
        (nsections,) = _U16.unpack_from(data, at)
        at += 2
        sections = []
        for _ in range(nsections):
            name_length = data[at]
            name = data[at + 1:at + 1 + name_length].decode("utf8")
            at += 1 + name_length
            instance, section_offset, length, crc = _SECTION_TAIL.unpack_from(data, at)
            at += _SECTION_TAIL.size
            sections.append(DeviceSectionCrc(name, instance, section_offset, length, crc))
        (stored_crc,) = _U32.unpack_from(data, at)
    except (struct.error, IndexError, UnicodeDecodeError):
        return None
    names = {code: name for name, code in spec.CHECKSUM_ALGORITHMS.items()}
    if (magic != spec.CHECKSUM_MAGIC or owner != increment or algorithm not in names
            or reserved != bytes(3) or at + 4 != size
            or spec.crc32(memoryview(data)[:at]) != stored_crc):
        return None
    return ChecksumBlock(algorithm=names[algorithm], ram_digest=digest,
                         page_crcs=_u32s_from_be(page_bytes), gap_crcs=_u32s_from_be(gap_bytes),
                         sections=tuple(sections))


def check_checksums(info: IncrementInfo, runs: Sequence[PageRun], block: ChecksumBlock) -> None:
    """Raise FormatError unless ``block`` has a CRC for each of ``info``'s data pages and for each
    gap of its stream (data runs + 1)."""
    data_runs = runs.data_counts()[0] if isinstance(runs, IndexRecords) else \
        sum(1 for run in runs if not run.zero)
    check_checksum_counts(info, data_runs, block)


def check_checksum_counts(info: IncrementInfo, data_runs: int, block: ChecksumBlock) -> None:
    """:func:`check_checksums` for a page index with ``data_runs`` data runs."""
    if len(block.page_crcs) != info.pages:
        raise FormatError(
            f"checksum block holds {len(block.page_crcs)} page CRCs for {info.pages} data pages",
            increment=info.index,
            offset=info.checksum_offset,
        )
    if len(block.sections) > load_spec().MAX_DEVICE_SECTIONS:
        raise FormatError(
            f"checksum block lists {len(block.sections)} device sections",
            increment=info.index,
            offset=info.checksum_offset,
        )
    stream_end = info.stream_offset + info.stream_length
    for section in block.sections:
        if section.offset < info.stream_offset or section.offset + section.length > stream_end:
            raise FormatError(
                f"checksum block: device section {section.name!r} lies outside the stream",
                increment=info.index,
                offset=info.checksum_offset,
            )
    if len(block.gap_crcs) != data_runs + 1:
        raise FormatError(
            f"checksum block holds {len(block.gap_crcs)} gap CRCs for {data_runs} data runs "
            f"(expected {data_runs + 1})",
            increment=info.index,
            offset=info.checksum_offset,
        )
