"""An increment's stream read back for its CRCs, and compared with its checksum block.

What an increment's checksum block holds is described in ``formats/chpt.construct.py``: a CRC-32C
per data page, one per stream gap (the stream bytes outside the data runs' extents: section
headers, zero records, device sections), and the RAM digest. This module computes the first two
from the file (:func:`stream_crcs`: C passes with the GIL released, two threads for a long
stream), finds the device sections in the last gap (:func:`device_sections`), and names every
disagreement with a checksum block (:func:`compare_stream`). Any thread.
"""

from __future__ import annotations

import array
import os
import struct
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pyvmm._native import ffi, lib
from pyvmm.errors import ChecksumError, FormatError, StreamError
from pyvmm.ram import PAGE_SIZE

from .checksum_format import ChecksumBlock, DeviceSectionCrc
from .checksum_table import crc32c, u32_array
from .container_format import PAGE_RECORD_HEADER, IncrementInfo, PageRun, RamBlockInfo

MAX_DEVICE_GAP = 64 << 20
"""Largest last gap searched for the device sections (it holds them, the trailer and the zero
records after the last data run)."""
_SECTION_FULL = 0x04


@dataclass(frozen=True)
class StreamCrcs:
    """CRCs of one increment's stream as read from the file: ``page_crcs`` in page-index order
    (``None`` when page data was skipped) and ``gap_crcs`` with ``gaps`` (offset, length) in
    file order."""

    page_crcs: array.array[int] | None
    gap_crcs: array.array[int]
    gaps: list[tuple[int, int]]


PARALLEL_PAGES = 16384
"""Streams with at least this many data pages are read back by two threads (the pread copy out
of the page cache is CPU-bound: two cores halve it)."""


class _Part:
    """One C pass over a byte range of a stream holding some of its (sorted) data runs."""

    def __init__(self, start: int, end: int,
                 runs: list[tuple[int, int, int, int]]) -> None:
        self.start, self.end, self.runs = start, end, runs
        self.gap_crcs = u32_array(len(runs) + 1)
        self.rc = 0
        self.err = ffi.new("struct pyvmm_crc_error *")

    def run(self, fd: int, page_size: int, page_ptr: object) -> None:
        c_runs = ffi.new("struct pyvmm_crc_run[]", max(len(self.runs), 1))
        for i, (offset, npages, first, out_index) in enumerate(self.runs):
            c_runs[i].data_offset = offset
            c_runs[i].npages = npages
            c_runs[i].first_page = first
            c_runs[i].out_index = out_index
        self.rc = lib.pyvmm_crc32c_stream(
            fd, self.start, self.end - self.start, c_runs, len(self.runs), page_size,
            PAGE_RECORD_HEADER + page_size, page_ptr,
            ffi.from_buffer("unsigned int[]", self.gap_crcs, require_writable=True), self.err)

    def check(self, info: IncrementInfo, page_size: int) -> None:
        rc, err = self.rc, self.err
        at = int(err.offset) or None
        if rc < 0:
            raise StreamError(f"cannot read the stream: {os.strerror(-rc)} (errno {-rc})",
                              increment=info.index, offset=at) from OSError(-rc,
                                                                            os.strerror(-rc))
        if rc == lib.PYVMM_CRC_TRUNCATED:
            raise FormatError("the stream is cut short by the end of the file",
                              increment=info.index, offset=at)
        if rc == lib.PYVMM_CRC_BAD_RUNS:
            raise FormatError(f"data run at 0x{self.runs[int(err.run)][0]:x} overlaps another "
                              f"or lies outside the stream", increment=info.index)
        if rc == lib.PYVMM_CRC_BAD_HEADER:
            _, _, first, _ = self.runs[int(err.run)]
            _bad_header(info, first + int(err.page), int(err.found), int(err.offset),
                        page_size)
        assert rc == 0, rc


def _bad_header(info: IncrementInfo, page: int, found: int, offset: int,
                page_size: int) -> None:
    want = page * page_size | 0x28
    raise FormatError(f"record header of page {page} is 0x{found:016x}, expected "
                      f"0x{want:016x}", increment=info.index, offset=offset)


def stream_crcs(fd: int, info: IncrementInfo, runs: Sequence[PageRun], *,
                page_size: int = PAGE_SIZE, pages: bool = True) -> StreamCrcs:
    """C passes over increment ``info``'s stream: its page CRCs (with ``pages``; the record
    headers inside data runs are compared with the expected ones too) and its gap CRCs (without
    ``pages``, the page data is not read at all). A long stream is cut in two at a page boundary
    and read by two threads (GIL released). FormatError for runs that do not fit the stream or
    a wrong record header, StreamError for I/O errors. Any thread."""
    stride = PAGE_RECORD_HEADER + page_size
    data_runs = []
    position = 0
    for run in runs:  # compressed runs are stream bytes like any other (their frames check
        if not run.zero and not run.compressed:  # themselves: pageio.check_compressed_runs)
            data_runs.append((run.data_offset, run.npages, run.first_page, position))
            position += run.npages
    data_runs.sort()
    stream_end = info.stream_offset + info.stream_length
    page_crcs = u32_array(position) if pages else None
    page_ptr = (ffi.from_buffer("unsigned int[]", page_crcs, require_writable=True)
                if page_crcs is not None and position else
                ffi.new("unsigned int[]", 1) if pages else ffi.NULL)
    split_header: tuple[int, int] | None = None  # (file offset, page) of a header between parts
    if pages and position >= PARALLEL_PAGES:
        # cut where half the pages are on each side, inside a run if need be
        left = position // 2
        r = 0
        while data_runs[r][1] <= left:
            left -= data_runs[r][1]
            r += 1
        offset, npages, first, out_index = data_runs[r]
        if left == 0:
            parts = [_Part(info.stream_offset, offset, data_runs[:r]),
                     _Part(offset, stream_end, data_runs[r:])]
        else:
            second = offset + left * stride
            parts = [_Part(info.stream_offset, second - PAGE_RECORD_HEADER,
                           data_runs[:r] + [(offset, left, first, out_index)]),
                     _Part(second, stream_end, [(second, npages - left, first + left,
                                                 out_index + left)] + data_runs[r + 1:])]
            split_header = (second - PAGE_RECORD_HEADER, first + left)
        helper = threading.Thread(target=parts[1].run, args=(fd, page_size, page_ptr),
                                  name="pyvmm-crc")
        helper.start()
        try:
            parts[0].run(fd, page_size, page_ptr)
        finally:
            helper.join()
        for part in parts:
            part.check(info, page_size)
        # the first part's last gap is empty when cut inside a run; the second's first always
        head = parts[0].gap_crcs if split_header is None else parts[0].gap_crcs[:-1]
        gap_crcs = head + parts[1].gap_crcs[1:]
        if split_header is not None:
            header_offset, page = split_header
            raw = os.pread(fd, PAGE_RECORD_HEADER, header_offset)
            found = int.from_bytes(raw, "big") if len(raw) == PAGE_RECORD_HEADER else -1
            if found != page * page_size | 0x28:
                _bad_header(info, page, found, header_offset, page_size)
    else:
        part = _Part(info.stream_offset, stream_end, data_runs)
        part.run(fd, page_size, page_ptr)
        part.check(info, page_size)
        gap_crcs = part.gap_crcs
    gaps = []
    start = info.stream_offset
    for offset, npages, _, _ in data_runs:
        gaps.append((start, offset - start))
        start = offset + (npages - 1) * stride + page_size
    gaps.append((start, stream_end - start))
    return StreamCrcs(page_crcs, gap_crcs, gaps)


def page_location(header_blocks: Sequence[RamBlockInfo], runs: Sequence[PageRun],
                  position: int, page_size: int = PAGE_SIZE) -> str:
    """'RAM block NAME page P (GPA 0x...)' of the data page at ``position`` in page-index order."""
    for run in runs:
        if run.zero:
            continue
        if position < run.npages:
            block = header_blocks[run.block]
            page = run.first_page + position
            return f"RAM block {block.name!r} page {page} (GPA 0x{block.gpa + page * page_size:x})"
        position -= run.npages
    return f"data page {position}"


def _section_crc(fd: int, section: DeviceSectionCrc) -> int:
    data = os.pread(fd, section.length, section.offset)  # checked inside the stream
    return crc32c(data) if len(data) == section.length else -1


def device_sections(fd: int, gap: tuple[int, int], device_bytes: bytes,
                    devices: Sequence[Mapping[str, object]]) -> tuple[DeviceSectionCrc, ...]:
    """The device sections of a stream whose last gap is ``gap`` (offset, length) and which
    holds ``device_bytes``, the FULL sections of ``devices`` (the savevm descriptions, in
    order): found by their headers, each with its CRC. ``()`` when they cannot be found."""
    offset, length = gap
    if not device_bytes or not devices or length > MAX_DEVICE_GAP:
        return ()
    where = os.pread(fd, length, offset).rfind(device_bytes)
    if where < 0:
        return ()
    starts: list[tuple[str, int, int]] = []
    position = 0
    for device in devices:
        name, instance = device.get("name"), device.get("instance_id")
        if not isinstance(name, str) or not isinstance(instance, int):
            return ()
        idstr = name.encode()
        tail = bytes([len(idstr)]) + idstr + struct.pack(">I", instance)
        found = device_bytes.find(tail, position + 5)
        if found < 5 or device_bytes[found - 5] != _SECTION_FULL:
            return ()
        starts.append((name, instance, found - 5))
        position = found
    sections = []
    for number, (name, instance, start) in enumerate(starts):
        end = starts[number + 1][2] if number + 1 < len(starts) else len(device_bytes)
        sections.append(DeviceSectionCrc(name, instance, offset + where + start, end - start,
                                         crc32c(device_bytes[start:end])))
    return tuple(sections)


def compare_stream(fd: int, info: IncrementInfo, runs: Sequence[PageRun],
                   layout: Sequence[RamBlockInfo], block: ChecksumBlock,
                   crcs: StreamCrcs) -> list[ChecksumError]:
    """Every disagreement between a stream's CRCs and its checksum block (first gap, first few
    pages), as ChecksumErrors naming the increment and the device section, page or byte
    range."""
    problems = []
    for number, (want, have) in enumerate(zip(block.gap_crcs, crcs.gap_crcs)):
        if want != have:
            offset, length = crcs.gaps[number]
            last = number == len(crcs.gaps) - 1
            damaged = [d for d in block.sections if last and _section_crc(fd, d) != d.crc]
            if damaged:
                d = damaged[0]
                problems.append(ChecksumError(
                    f"device section {d.name!r} instance {d.instance_id} (bytes "
                    f"0x{d.offset:x}..0x{d.offset + d.length:x}) does not match its checksum",
                    increment=info.index, offset=d.offset, section=d.name))
                break
            what = "after the RAM pages (device sections, trailer)" if last else \
                "outside page data"
            problems.append(ChecksumError(
                f"stream bytes 0x{offset:x}..0x{offset + length:x} {what} do not match their "
                f"checksum", increment=info.index, offset=offset))
            break
    if crcs.page_crcs is not None and crcs.page_crcs != block.page_crcs:
        bad = [i for i, (a, b) in enumerate(zip(block.page_crcs, crcs.page_crcs)) if a != b]
        shown = ", ".join(page_location(layout, runs, i) for i in bad[:3])
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        problems.append(ChecksumError(
            f"page data of {shown}{more} does not match its checksum", increment=info.index))
    return problems
