"""The checksum block of a format-2 checkpoint increment (``checksum`` capability): its value
type, and its encoding, decoding and checks against the increment it belongs to.

The bytes are declared in ``formats/chpt.construct.py`` (``ChecksumBlob``, with what each CRC
covers); like :mod:`pyvmm.migration.container_format`, whose loader and error mapping it uses,
this module does no I/O and answers hostile bytes with a value or a FormatError.
"""

from __future__ import annotations

import array
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from pyvmm.errors import FormatError
from pyvmm.migration.container_format import IncrementInfo, PageRun, construct_call, load_spec


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


def check_checksums(info: IncrementInfo, runs: Sequence[PageRun], block: ChecksumBlock) -> None:
    """Raise FormatError unless ``block`` has a CRC for each of ``info``'s data pages and for each
    gap of its stream (data runs + 1)."""
    data_runs = sum(1 for run in runs if not run.zero)
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
