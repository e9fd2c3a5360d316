"""Properties of the checkpoint container (pyvmm.migration.container): round trips of every
structure, appends and reopening, truncation and corruption, crash safety, limits."""

from __future__ import annotations

import itertools
import os
import random
import signal
import struct
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st

from pyvmm.errors import (
    CheckpointWarning,
    ChecksumError,
    ConfigError,
    FormatError,
    PyvmmError,
    VersionError,
)
from pyvmm.migration import (
    checksum_format,
    container,
    container_format,
    header_format,
    page_index_format,
)
from pyvmm.migration.container import (
    PAGE_RECORD_HEADER,
    CheckpointFile,
    ContainerHeader,
    IncrementInfo,
    PageRun,
    RamBlockInfo,
    decode_header_slot,
    decode_page_index,
    decode_stats,
    encode_header_slot,
    encode_page_index,
    encode_stats,
    load_spec,
)

SPEC = load_spec()
SLOT = SPEC.SLOT_SIZE
PAGE = 4096
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FILES = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# ----- strategies ------------------------------------------------------------------------------

U64 = st.integers(0, 2**64 - 1)
NAMES = st.text(st.characters(codec="utf-8"), min_size=1, max_size=12)
CAPABILITY = st.text("abcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=1, max_size=20)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**60), 2**60) | st.text(max_size=8)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
STATS = st.dictionaries(st.text(max_size=10), JSON, max_size=6)


@st.composite
def ram_layouts(draw: st.DrawFn, page_size: int = PAGE) -> tuple[RamBlockInfo, ...]:
    """1..4 non-overlapping blocks with distinct names, at ascending guest addresses."""
    names = draw(st.lists(NAMES, min_size=1, max_size=4, unique=True))
    gpa = draw(st.integers(0, 2**20)) * page_size
    blocks = []
    for name in names:
        size = draw(st.integers(1, 64)) * page_size
        blocks.append(RamBlockInfo(name, gpa, size))
        gpa += size + draw(st.integers(0, 4)) * page_size
    return tuple(blocks)


@st.composite
def headers(draw: st.DrawFn) -> ContainerHeader:
    """Any header the container accepts: a consistent increment table over made-up offsets."""
    page_size = draw(st.sampled_from([512, 4096, 16384, 65536]))
    blocks = draw(ram_layouts(page_size))
    total = sum(b.size // page_size for b in blocks)
    increments: list[IncrementInfo] = []
    end = SPEC.DATA_START
    for index in range(draw(st.integers(0, 6))):
        kind = "full" if index == 0 else draw(st.sampled_from(["full", "incremental"]))
        stream_offset = (-(-end // 4096) + draw(st.integers(0, 3))) * 4096
        stream_length = draw(st.integers(0, 2**32))
        runs = draw(st.integers(0, total))
        index_length = SPEC.PAGE_INDEX_OVERHEAD + runs * SPEC.PAGE_RUN_SIZE
        stats_length = draw(st.sampled_from([0, SPEC.STATS_OVERHEAD, 200]))
        pages = draw(st.integers(0, total))
        info = IncrementInfo(
            index=index,
            kind=kind,
            parent=-1 if kind == "full" else draw(st.integers(0, index - 1)),
            created_ns=draw(U64),
            stream_offset=stream_offset,
            stream_length=stream_length,
            pages=pages,
            zero_pages=draw(st.integers(0, total - pages)),
            stream_crc=draw(st.integers(0, 2**32 - 1)),
            index_offset=stream_offset + stream_length,
            index_length=index_length,
            stats_offset=stream_offset + stream_length + index_length if stats_length else 0,
            stats_length=stats_length,
        )
        increments.append(info)
        end = info.end
    return ContainerHeader(
        format_version=SPEC.FORMAT_VERSION,
        page_size=page_size,
        vm_id=draw(st.binary(min_size=16, max_size=16)),
        machine=draw(st.text(max_size=20)),
        ram_blocks=blocks,
        capabilities=tuple(draw(st.lists(CAPABILITY, max_size=5, unique=True))),
        increments=tuple(increments),
        sequence=draw(U64),
    )


RUNS = st.lists(
    st.builds(
        PageRun,
        block=st.integers(0, 2**16 - 1),
        first_page=U64,
        npages=st.integers(0, 2**32 - 1),
        data_offset=U64,
        zero=st.booleans(),
        compressed=st.booleans(),  # one kind per run: zero wins below
    ).map(lambda run: run._replace(data_offset=0, compressed=False) if run.zero else run),
    max_size=40,
)

# ----- round trips -----------------------------------------------------------------------------


@FAST
@given(headers())
def test_header_slot_round_trip(header: ContainerHeader) -> None:
    data = encode_header_slot(header)
    assert len(data) <= SLOT
    assert decode_header_slot(data) == header
    assert decode_header_slot(data.ljust(SLOT, b"\0")) == header  # slot padding is ignored
    assert encode_header_slot(decode_header_slot(data)) == data
    assert data[:8] == SPEC.MAGIC and data[8:12] == b"\x01\x02\x03\x04"


def _reference_slot(header: ContainerHeader) -> bytes:
    """A header slot built by the format declaration alone."""
    body = header_format._encode_header_body_construct(header)
    frame = {"format_version": header.format_version, "sequence": header.sequence, "body": body}
    return bytes(container_format.construct_call(
        lambda: SPEC.HeaderSlot.build({"frame": {"value": frame}}), "header"))


def _outcome(build: Any, header: ContainerHeader) -> Any:
    try:
        return build(header)
    except Exception as err:  # noqa: BLE001 - the kind and text of any error are compared
        return type(err), str(err)


@FAST
@given(headers(), st.sampled_from([1, 2]), st.data())
def test_header_slot_fast_encoder_matches_the_declaration(
    header: ContainerHeader, version: int, data: st.DataObject
) -> None:
    """encode_header_slot's struct path gives the declaration's bytes in both format versions,
    and leaves a value no field can hold to the declaration, which refuses it with its error."""
    increments = header.increments
    if version == 2 and increments and data.draw(st.booleans()):
        increments = tuple(replace(i, checksum_offset=i.end, checksum_length=64)
                           for i in increments)
    header = replace(header, format_version=version, increments=increments)
    assert encode_header_slot(header) == _reference_slot(header)
    where, field, bad = data.draw(st.sampled_from([
        ("header", "sequence", 1 << 64), ("header", "page_size", -1),
        ("increment", "pages", -1), ("increment", "created_ns", 1 << 64),
        ("increment", "stream_crc", 1 << 32), ("increment", "parent", 1 << 31),
        ("increment", "kind", "partial"), ("increment", "checksum_length", 1 << 64),
        ("increment", "checksum_offset", 8)]))  # format 1 has no checksum block
    if where == "header":
        broken = replace(header, **{field: bad})
    elif increments:
        victim = data.draw(st.integers(0, len(increments) - 1))
        changed = replace(increments[victim], **{field: bad})
        broken = replace(header, increments=increments[:victim] + (changed,)
                         + increments[victim + 1:])
    else:
        return
    reference = _outcome(_reference_slot, broken)
    assert isinstance(reference, tuple) or field == "checksum_offset"
    assert _outcome(encode_header_slot, broken) == reference


@FAST
@given(headers(), st.sampled_from([1, 2]), st.data())
def test_header_body_fast_decoder_matches_the_declaration(
    header: ContainerHeader, version: int, data: st.DataObject
) -> None:
    """decode_header_body's struct path returns the header the declaration parses, in both
    format versions; with a byte flipped or the body cut, it returns what the declaration
    parses or declines, and it declines whatever the declaration refuses (which then names
    the error)."""
    increments = header.increments
    if version == 2 and increments and data.draw(st.booleans()):
        increments = tuple(replace(i, checksum_offset=i.end, checksum_length=64)
                           for i in increments)
    header = replace(header, format_version=version, increments=increments)
    body = header_format._encode_header_body_construct(header)

    def reference(raw: bytes) -> Any:
        return _outcome(lambda raw: header_format._decode_header_body_construct(
            version, header.sequence, raw, offset=0), raw)

    fast = header_format._decode_header_body_fast
    assert fast(version, header.sequence, body) == header == reference(body)
    damaged = bytearray(body)
    at = data.draw(st.integers(0, len(body) - 1))
    damaged[at] ^= data.draw(st.integers(1, 255))
    if data.draw(st.booleans()):
        damaged = bytearray(body[:at])
    expected = reference(bytes(damaged))
    got = fast(version, header.sequence, bytes(damaged))
    if isinstance(expected, tuple):  # refused, with the declaration's error
        assert got is None
    else:
        assert got in (None, expected)


@FAST
@given(st.integers(0, 2**32 - 1), RUNS)
def test_page_index_round_trip(increment: int, runs: list[PageRun]) -> None:
    data = encode_page_index(increment, runs)
    assert len(data) == SPEC.PAGE_INDEX_OVERHEAD + len(runs) * SPEC.PAGE_RUN_SIZE
    assert decode_page_index(data, increment=increment) == runs
    assert encode_page_index(increment, decode_page_index(data, increment=increment)) == data


def _decode_or_error(decode: Any, data: bytes, increment: int) -> Any:
    try:
        return decode(data, increment=increment)
    except FormatError as err:
        return type(err), str(err)


@FAST
@given(st.integers(0, 2**32 - 1), RUNS, st.integers(0, 2**32 - 1), st.data())
def test_page_index_fast_path_matches_the_declaration(
    increment: int, runs: list[PageRun], asked: int, data: st.DataObject
) -> None:
    """decode_page_index's struct fast path accepts exactly what the construct declaration
    accepts, with the same runs, and leaves every rejection (and its message) to the latter:
    for sound blobs, blobs of another increment, and blobs with one byte flipped or cut."""
    blob = encode_page_index(increment, runs)
    assert page_index_format._decode_page_index_fast(blob, increment) == runs
    flip = data.draw(st.integers(0, len(blob) - 1))
    bit = data.draw(st.integers(0, 7))
    damaged = bytearray(blob)
    damaged[flip] ^= 1 << bit
    for candidate, owner in ((blob, increment), (blob, asked), (bytes(damaged), increment),
                             (blob[:-1], increment), (blob + b"\0", increment)):
        fast = page_index_format._decode_page_index_fast(candidate, owner)
        reference = _decode_or_error(page_index_format._decode_page_index_construct, candidate,
                                     owner)
        if fast is not None:
            assert fast == reference
        assert _decode_or_error(decode_page_index, candidate, owner) == reference
    if flip >= 12 and (flip - 12) % SPEC.PAGE_RUN_SIZE == 3 and flip < len(blob) - 4:
        # the reserved byte of a run, with the CRC made to match: refused, by both
        body = bytes(damaged[:-4])
        forged = body + struct.pack(">I", SPEC.crc32(body))
        assert page_index_format._decode_page_index_fast(forged, increment) is None
        with pytest.raises(FormatError):
            decode_page_index(forged, increment=increment)


@FAST
@given(st.integers(0, 2**32 - 1), RUNS, st.data())
def test_page_index_fast_encoder_matches_the_declaration(increment: int, runs: list[PageRun],
                                                         data: st.DataObject) -> None:
    """encode_page_index's struct path builds the construct declaration's bytes, and leaves a
    value no field can hold to the declaration, which refuses it with its own error."""
    assert page_index_format._encode_page_index_fast(increment, runs) == \
        page_index_format._encode_page_index_construct(increment, runs)
    if not runs:
        return
    field, bad = data.draw(st.sampled_from([("block", 1 << 16), ("npages", 1 << 32),
                                            ("first_page", 1 << 64), ("data_offset", -1)]))
    victim = data.draw(st.integers(0, len(runs) - 1))
    broken = list(runs)
    broken[victim] = runs[victim]._replace(**{field: bad})
    assert page_index_format._encode_page_index_fast(increment, broken) is None
    with pytest.raises(Exception) as fast_way:
        encode_page_index(increment, broken)
    with pytest.raises(Exception) as reference:
        page_index_format._encode_page_index_construct(increment, broken)
    assert (type(fast_way.value), str(fast_way.value)) == \
        (type(reference.value), str(reference.value))


@FAST
@given(st.integers(0, 2**32 - 1), RUNS, st.integers(-50, 50))
def test_index_records_are_the_runs(increment: int, runs: list[PageRun], at: int) -> None:
    """Runs kept as page index records (as a save keeps them) are the same runs, encode to the
    same blob, and count the same pages."""
    records = container_format.IndexRecords(encode_page_index(increment, runs)[12:-4])
    assert records == runs and list(records) == runs and len(records) == len(runs)
    assert records[1:4] == runs[1:4]
    if -len(runs) <= at < len(runs):
        assert records[at] == runs[at]
    else:
        with pytest.raises(IndexError):
            records[at]
    assert encode_page_index(increment, records) == encode_page_index(increment, runs)
    assert records.pages() == sum(run.npages for run in runs)
    data = [run.npages for run in runs if not run.zero]
    assert records.data_counts() == (len(data), sum(data))
    assert container_format.IndexRecords(records.records) == records
    with pytest.raises(ValueError, match="24 bytes each"):
        container_format.IndexRecords(records.records + b"\0")


SMALL_RUNS = st.lists(
    st.builds(PageRun, block=st.integers(0, 2), first_page=st.integers(0, 12),
              npages=st.integers(0, 4), data_offset=st.integers(4000, 4200).map(lambda o: o * 8),
              zero=st.booleans(), compressed=st.just(False)),
    max_size=6,
)


@FAST
@given(SMALL_RUNS, st.booleans(), st.data())
def test_commit_check_in_c_agrees_with_check_page_runs(runs: list[PageRun], in_order: bool,
                                                       data: st.DataObject) -> None:
    """The commit's C check of a save's records passes exactly those runs in RAM order that
    ``check_page_runs`` passes (anything else goes to the Python check, which names the fault)."""
    if in_order:
        runs = sorted(runs)
    if data.draw(st.booleans()):  # mostly sound zero runs: data offsets only on some
        runs = [run._replace(data_offset=0) if run.zero else run for run in runs]
    layout = (RamBlockInfo("a", 0, 10 * PAGE), RamBlockInfo("b", 1 << 30, 16 * PAGE))
    header = ContainerHeader(1, PAGE, bytes(16), "virt", layout, (), (), 0)
    counts = (sum(r.npages for r in runs if not r.zero), sum(r.npages for r in runs if r.zero))
    info = IncrementInfo(0, "full", -1, 0, 32000, 5 * (PAGE + 8), *counts, 0, 0, 0, 0, 0)
    try:
        page_index_format.check_page_runs(header, info, runs)
        python_ok = True
    except FormatError:
        python_ok = False
    records = container_format.IndexRecords(encode_page_index(0, runs)[12:-4])
    c_ok = CheckpointFile._records_sound(header, info, records)
    ram_order = all((a.block, a.first_page + a.npages) <= (b.block, b.first_page)
                    for a, b in itertools.pairwise(runs))
    assert c_ok == (python_ok and ram_order)
    assert not CheckpointFile._records_sound(header, info, runs)  # a list: Python decides
    wrong = replace(info, pages=info.pages + 1)
    assert not CheckpointFile._records_sound(header, wrong, records)


@FAST
@given(st.integers(0, 2**32 - 1), STATS)
def test_stats_round_trip(increment: int, stats: dict[str, Any]) -> None:
    data = encode_stats(increment, stats)
    assert decode_stats(data, increment=increment) == stats
    assert encode_stats(increment, decode_stats(data, increment=increment)) == data


def test_page_index_expected_bytes() -> None:
    data = encode_page_index(3, [PageRun(1, 0x10, 2, 0x20008, False), PageRun(0, 5, 7, 0, True)])
    body = (
        b"PGIX"
        + b"\x00\x00\x00\x03"  # increment
        + b"\x00\x00\x00\x02"  # two runs
        + b"\x00\x01" + b"\x00" + b"\x00" + b"\x00\x00\x00\x02"  # block 1, flags, reserved, npages
        + struct.pack(">QQ", 0x10, 0x20008)  # first page, data offset
        + b"\x00\x00" + b"\x01" + b"\x00" + b"\x00\x00\x00\x07"  # block 0, zero run, 7 pages
        + struct.pack(">QQ", 5, 0)
    )
    assert data == body + struct.pack(">I", SPEC.crc32(body))


def test_header_expected_bytes() -> None:
    block = RamBlockInfo("ram", 0x4000_0000, 0x1000)
    header = ContainerHeader(1, 4096, bytes(range(16)), "virt", (block,), ("x-live",), (), 7)
    body = (
        b"\x00\x00\x10\x00"  # page size
        + bytes(range(16))  # VM id
        + b"\x04virt"
        + b"\x00\x01" + b"\x03ram" + struct.pack(">QQ", 0x4000_0000, 0x1000)
        + b"\x01" + b"\x06x-live"
        + b"\x00\x00\x00\x00"  # no increments
    )
    frame = b"PYVMMCPT" + b"\x01\x02\x03\x04" + struct.pack(">IIQ", 1, 28 + len(body) + 4, 7) + body
    assert encode_header_slot(header) == frame + struct.pack(">I", SPEC.crc32(frame))


@FAST
@given(st.binary(max_size=300), st.integers(0, 2**32 - 1))
def test_negative_random_bytes_never_escape(data: bytes, increment: int) -> None:
    """Garbage given to every decoder: FormatError or a value, nothing else."""
    for decode in (decode_header_slot, lambda d: decode_page_index(d, increment=increment),
                   lambda d: decode_stats(d, increment=increment),
                   lambda d: checksum_format.decode_checksums(d, increment=increment)):
        for candidate in (data, SPEC.MAGIC + data, b"PGIX" + data, b"STAT" + data,
                          b"CSUM" + data):
            try:
                decode(candidate)
            except FormatError:
                pass


@FAST
@given(st.binary(max_size=400), st.integers(1, 3), U64)
def test_negative_hostile_body_with_valid_crc(body: bytes, version: int, sequence: int) -> None:
    """A slot whose CRC holds but whose body is garbage or from another version."""
    frame = {"format_version": version, "sequence": sequence, "body": body}
    data = SPEC.HeaderSlot.build({"frame": {"value": frame}})
    try:
        header = decode_header_slot(data)
    except VersionError:
        assert version > SPEC.FORMAT_VERSION
    except FormatError:
        assert version <= SPEC.FORMAT_VERSION
    else:  # garbage that happens to be a sound header: it must then round-trip
        # every version this pyvmm reads, it also writes (appends keep a file's version)
        assert version <= SPEC.FORMAT_VERSION and encode_header_slot(header) == data


@FAST
@given(st.integers(0, 2**32 - 1), st.lists(st.tuples(st.integers(0, 2**16 - 1), st.integers(0, 255),
       st.integers(0, 2**32 - 1), U64, U64), max_size=8), st.binary(max_size=40))
def test_negative_hostile_index_and_stats_with_valid_crc(
    increment: int, raw_runs: list[tuple[int, int, int, int, int]], text: bytes
) -> None:
    runs = [
        {"block": b, "flags": f, "npages": n, "first_page": p, "data_offset": o} for b, f, n, p, o in raw_runs
    ]
    blob = SPEC.PageIndex.build({"fields": {"value": {"increment": increment, "runs": runs}}})
    try:
        decoded = decode_page_index(blob, increment=increment)
        assert all(f & ~SPEC.RUN_FLAGS == 0 for _, f, _, _, _ in raw_runs)
        assert len(decoded) == len(raw_runs)
    except FormatError:
        assert any(f & ~SPEC.RUN_FLAGS for _, f, _, _, _ in raw_runs)
    stats = SPEC.StatsBlob.build({"fields": {"value": {"increment": increment, "json": text}}})
    try:
        assert isinstance(decode_stats(stats, increment=increment), dict)
    except FormatError:
        pass


def test_negative_checksums(small_file: tuple[Path, ContainerHeader]) -> None:
    """A changed byte under a CRC is a ChecksumError naming the increment and the offset."""
    path, header = small_file
    info = header.increments[1]
    image = bytearray(path.read_bytes())
    image[info.index_offset + SPEC.PAGE_INDEX_OVERHEAD] ^= 0x40  # inside the first run
    path.write_bytes(image)
    with CheckpointFile.open(path) as cf, pytest.raises(ChecksumError) as error:
        cf.page_index(1)
    assert (error.value.increment, error.value.offset) == (1, info.index_offset)
    where = f"(increment 1, offset 0x{info.index_offset:x})"
    assert str(error.value) == f"page index: checksum mismatch {where}"


def test_negative_deeply_nested_stats() -> None:
    text = b"[" * 100_000 + b"]" * 100_000
    blob = SPEC.StatsBlob.build({"fields": {"value": {"increment": 0, "json": text}}})
    with pytest.raises(FormatError, match="not valid JSON"):
        decode_stats(blob, increment=0)


# ----- files: a writer of fake increments --------------------------------------------------------

LAYOUT = (RamBlockInfo("mach-virt.ram", 0x4000_0000, 48 * PAGE), RamBlockInfo("rom", 0, 8 * PAGE))


@dataclass(frozen=True)
class FakeIncrement:
    """What one made-up increment holds: its stream bytes and the index and stats describing it."""

    payload: bytes
    runs: tuple[PageRun, ...]
    pages: int
    zero_pages: int
    stats: dict[str, Any]


def fake_increment(index: int, stream_offset: int, max_pages: int = 12) -> FakeIncrement:
    """A deterministic function of (index, offset): a stream-like payload with page records.

    Data runs lie in the payload as ``be64 header + page`` records (the stride the page index
    promises); zero runs are in the stream as ``be64 + fill`` and have no data.
    """
    rng = random.Random(index * 7919 + stream_offset)
    payload = bytearray(b"QEVM\x00\x00\x00\x03" + index.to_bytes(4, "big"))
    runs = []
    pages = zero_pages = 0
    for block_no, block in enumerate(LAYOUT):
        block_pages = block.size // PAGE
        page = rng.randrange(0, 3)
        while page < block_pages and pages + zero_pages < max_pages:
            npages = min(rng.randint(1, 4), block_pages - page)
            if rng.random() < 0.3:
                for k in range(npages):
                    payload += struct.pack(">QB", (page + k) * PAGE | 0x02, 0)
                runs.append(PageRun(block_no, page, npages, 0, True))
                zero_pages += npages
            else:
                data_offset = stream_offset + len(payload) + PAGE_RECORD_HEADER
                for k in range(npages):
                    payload += struct.pack(">Q", (page + k) * PAGE | 0x08)
                    payload += bytes([(index + page + k) & 0xFF]) * PAGE
                runs.append(PageRun(block_no, page, npages, data_offset, False))
                pages += npages
            page += npages + rng.randrange(0, 3)
    payload += b"\x00" * rng.randrange(0, 50)  # devices, EOF...
    stats = {"increment": index, "pages": pages, "rng": rng.random()} if index % 3 != 2 else {}
    return FakeIncrement(bytes(payload), tuple(runs), pages, zero_pages, stats)


def append_fake(cf: CheckpointFile, max_pages: int = 12) -> IncrementInfo:
    """Append the fake increment that belongs at the end of ``cf``."""
    kind = "full" if not cf.header.increments else "incremental"
    with cf.begin_increment(kind) as writer:
        fake = fake_increment(writer.index, writer.stream_offset, max_pages)
        os.pwrite(cf.fd, fake.payload, writer.stream_offset)
        return writer.commit(
            stream_length=len(fake.payload),
            page_runs=fake.runs,
            pages=fake.pages,
            zero_pages=fake.zero_pages,
            stats=fake.stats,
        )


def assert_increments_intact(cf: CheckpointFile, max_pages: int = 12) -> None:
    """Every increment in ``cf`` holds exactly what fake_increment made for it."""
    for info in cf.header.increments:
        fake = fake_increment(info.index, info.stream_offset, max_pages)
        assert info.stream_length == len(fake.payload)
        assert os.pread(cf.fd, info.stream_length, info.stream_offset) == fake.payload
        assert cf.page_index(info.index) == list(fake.runs)
        assert (info.pages, info.zero_pages) == (fake.pages, fake.zero_pages)
        assert cf.stats(info.index) == fake.stats
        assert info.kind == ("full" if info.index == 0 else "incremental")
        assert info.parent == info.index - 1
        for run in fake.runs:  # the stride promise, checked on the bytes
            if not run.zero:
                for k in range(run.npages):
                    start = run.data_offset + k * (PAGE_RECORD_HEADER + PAGE)
                    page = os.pread(cf.fd, PAGE, start)
                    assert page == bytes([(info.index + run.first_page + k) & 0xFF]) * PAGE


def new_file(path: Path, increments: int, max_pages: int = 12, **kwargs: Any) -> CheckpointFile:
    cf = CheckpointFile.create(path, page_size=PAGE, ram_blocks=LAYOUT, machine="virt",
                               capabilities=("x-incremental",), vm_id=bytes(range(16)), **kwargs)
    for _ in range(increments):
        append_fake(cf, max_pages)
    return cf


@pytest.fixture
def small_file(tmp_path: Path) -> Iterator[tuple[Path, ContainerHeader]]:
    """A closed file with three increments, and its header."""
    path = tmp_path / "small.chpt"
    with new_file(path, 3) as cf:
        header = cf.header
    yield path, header


def outcome(path: Path) -> ContainerHeader | FormatError:
    """Open, read every piece of metadata: the header, or the FormatError met on the way."""
    try:
        with CheckpointFile.open(path) as cf:
            for info in cf.header.increments:
                cf.page_index(info.index)
                cf.stats(info.index)
            return cf.header
    except FormatError as err:
        assert "\n" not in str(err)
        return err


# ----- files: the happy path ---------------------------------------------------------------------


@FILES
@given(st.integers(1, 6), st.integers(1, 40))
def test_append_and_reopen(tmp_path: Path, count: int, max_pages: int) -> None:
    path = tmp_path / f"a{count}-{max_pages}.chpt"
    with new_file(path, 0, overwrite=True) as cf:
        infos = [append_fake(cf, max_pages) for _ in range(count)]
        written = cf.header
        assert written.increments == tuple(infos)
    with CheckpointFile.open(path) as cf:
        assert cf.header == written
        assert cf.header.machine == "virt" and cf.header.ram_blocks == LAYOUT
        assert cf.header.capabilities == ("x-incremental",) and cf.header.vm_id == bytes(range(16))
        assert cf.rejected_slot is None
        for info in infos:
            fake = fake_increment(info.index, info.stream_offset, max_pages)
            assert os.pread(cf.fd, info.stream_length, info.stream_offset) == fake.payload
            assert cf.page_index(info.index) == list(fake.runs)
            assert cf.stats(info.index) == fake.stats
            assert info.stream_offset % 4096 == 0
        assert os.path.getsize(path) == cf.header.data_end
    # appending to a reopened file continues the chain
    with CheckpointFile.open(path, writable=True) as cf:
        info = append_fake(cf, max_pages)
        assert info.index == count and info.parent == count - 1
    with CheckpointFile.open(path) as cf:
        assert len(cf.header.increments) == count + 1
        assert cf.header.increments[:count] == written.increments


def test_abort_leaves_file_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "abort.chpt"
    with new_file(path, 2) as cf:
        before = path.read_bytes()
        writer = cf.begin_increment("incremental")
        os.pwrite(cf.fd, b"x" * 10000, writer.stream_offset)
        with pytest.raises(ValueError, match="outside the stream"):
            outside = [PageRun(0, 0, 1, writer.stream_offset, False)]
            writer.commit(stream_length=10, page_runs=outside, pages=1, zero_pages=0)
        with pytest.raises(ValueError, match="header says"):
            writer.commit(stream_length=10, page_runs=[], pages=1, zero_pages=0)
        writer.abort()
        assert path.read_bytes() == before
        with pytest.raises(PyvmmError, match="not allowed"):
            writer.commit(stream_length=0, page_runs=[], pages=0, zero_pages=0)
        append_fake(cf)  # the file goes on after an abort
        assert_increments_intact(cf)


def test_commit_checks_runs(tmp_path: Path) -> None:
    with new_file(tmp_path / "runs.chpt", 0) as cf, cf.begin_increment("full") as writer:
        os.pwrite(cf.fd, bytes(3 * (PAGE + 8)), writer.stream_offset)
        base: dict[str, Any] = {"stream_length": 3 * (PAGE + 8), "pages": 0, "zero_pages": 2}
        bad = [
            ([PageRun(2, 0, 2, 0, True)], "does not exist"),
            ([PageRun(1, 7, 2, 0, True)], "outside RAM block"),
            ([PageRun(0, 0, 2, 8, True)], "zero run has a data offset"),
            ([PageRun(0, 0, 1, 0, True), PageRun(0, 0, 1, 0, True)], "listed twice"),
        ]
        for runs, message in bad:
            with pytest.raises(ValueError, match=message):
                writer.commit(page_runs=runs, **base)
            records = container_format.IndexRecords(encode_page_index(0, runs)[12:-4])
            with pytest.raises(ValueError, match=message):  # as a save's records: the same
                writer.commit(page_runs=records, **base)
        with pytest.raises(ValueError, match="should end at byte"):
            writer.commit(stream_length=4 * (PAGE + 8), page_runs=[], pages=0, zero_pages=0)
        info = writer.commit(page_runs=[PageRun(0, 0, 2, 0, True)], **base)
        assert cf.page_index(info.index) == [PageRun(0, 0, 2, 0, True)]


def test_misuse_and_open_errors(tmp_path: Path) -> None:
    path = tmp_path / "m.chpt"
    with pytest.raises(ConfigError, match="no such checkpoint file"):
        CheckpointFile.open(tmp_path / "missing.chpt")
    with pytest.raises(ConfigError, match="not a regular file"):
        CheckpointFile.open(tmp_path)
    with new_file(path, 0) as cf:
        with pytest.raises(PyvmmError, match="needs a full one"):
            cf.begin_increment("incremental")
        cf.set_capabilities(["x-live", "zero-blocks"])
        with pytest.raises(ConfigError, match="open for writing in another process"):
            CheckpointFile.open(path, writable=True)
        append_fake(cf)
        with pytest.raises(PyvmmError, match="before the first increment"):
            cf.set_capabilities([])
    with pytest.raises(ConfigError, match="already exists"):
        new_file(path, 0)
    with CheckpointFile.open(path) as cf:
        assert cf.header.capabilities == ("x-live", "zero-blocks")
        with pytest.raises(PyvmmError, match="read-only"):
            cf.begin_increment("full")
    with pytest.raises(ConfigError, match="page size"):
        CheckpointFile.create(tmp_path / "p", page_size=1000, ram_blocks=LAYOUT, machine="v")
    with pytest.raises(ConfigError, match="overlaps"):
        overlapping = [RamBlockInfo("a", 0, 2 * PAGE), RamBlockInfo("b", PAGE, PAGE)]
        CheckpointFile.create(tmp_path / "p", page_size=PAGE, machine="v", ram_blocks=overlapping)
    not_chpt = tmp_path / "not.chpt"
    not_chpt.write_bytes(b"\x7fELF" + bytes(200_000))
    with pytest.raises(FormatError, match=r"is not a pyvmm checkpoint file \(bad magic\)"):
        CheckpointFile.open(not_chpt)


def test_newer_version_is_refused(small_file: tuple[Path, ContainerHeader]) -> None:
    path, header = small_file
    newer = SPEC.FORMAT_VERSION + 1
    body = SPEC.HEADER_BODIES[SPEC.FORMAT_VERSION].build(header_format._body_value(header))
    frame = {"format_version": newer, "sequence": header.sequence + 1, "body": body}
    slot = SPEC.HeaderSlot.build({"frame": {"value": frame}})
    with open(path, "r+b") as f:
        f.seek((_current_slot(header) ^ 1) * SLOT)  # the older slot: where a writer would write
        f.write(slot)
    with pytest.raises(VersionError, match=f"format version {newer} is newer than this pyvmm"):
        CheckpointFile.open(path)


def test_header_full_gives_a_clear_error(tmp_path: Path) -> None:
    # long block names shrink the room left for the increment table
    blocks = [RamBlockInfo(f"{i:03d}" + "b" * 252, i * PAGE, PAGE) for i in range(236)]
    path = tmp_path / "full.chpt"
    with CheckpointFile.create(path, page_size=PAGE, ram_blocks=blocks, machine="virt") as cf:
        limit = cf.max_increments
        assert 1 <= limit < 40
        for index in range(limit):
            with cf.begin_increment("full" if index == 0 else "incremental") as writer:
                writer.commit(stream_length=0, page_runs=[], pages=0, zero_pages=0)
        size = os.path.getsize(path)
        full = f"is full: .* holds at most {limit} increments"
        with pytest.raises(FormatError, match=full) as info:
            cf.begin_increment("incremental")
        assert info.value.increment == limit
        assert os.path.getsize(path) == size
    with CheckpointFile.open(path) as cf:
        assert len(cf.header.increments) == limit
    too_many = [RamBlockInfo(f"{i:03d}" + "b" * 252, i * PAGE, PAGE) for i in range(245)]
    with pytest.raises(ConfigError, match="header"):
        CheckpointFile.create(tmp_path / "x", page_size=PAGE, ram_blocks=too_many, machine="v")


# ----- files: truncation and corruption ----------------------------------------------------------


def _used(header_bytes: bytes) -> int:
    return int(struct.unpack_from(">I", header_bytes, 16)[0])  # the slot's length field


def _check_cut(path: Path, cut: int, header: ContainerHeader) -> None:
    """A file cut at ``cut``: inside the last increment, the older slot (one increment fewer)
    is loaded with a warning naming the slot passed over; anywhere else, one FormatError."""
    older = replace(header, increments=header.increments[:-1],
                                sequence=header.sequence - 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = outcome(path)
    if cut >= older.data_end:
        assert result == older, cut
        assert len(caught) == 1 and issubclass(caught[0].category, CheckpointWarning), cut
        assert "points past the end of the file" in str(caught[0].message)
        assert f"{len(older.increments)} increments" in str(caught[0].message)
    else:
        assert isinstance(result, FormatError), cut


def test_negative_truncation(tmp_path: Path) -> None:
    """Cut the file at every byte of its metadata, and often elsewhere: one FormatError, or
    inside the last increment the state before it (the reader falls back to the older slot,
    as after a writer stopped between publishing a header and finishing its file)."""
    path = tmp_path / "cut.chpt"
    with new_file(path, 3, max_pages=4) as cf:
        header = cf.header
    data = path.read_bytes()
    assert len(data) == header.data_end
    cuts = set(range(0, len(data), 251))
    for _, start, end in _regions(data, header):
        # every byte where metadata lies, the edges of the rest
        cuts |= set(range(start, end)) if end - start < 2000 else {start, start + 1, end - 1}
    cuts.discard(len(data))
    for cut in sorted(cuts, reverse=True):  # one file, cut shorter and shorter
        os.truncate(path, cut)
        _check_cut(path, cut, header)


@pytest.mark.slow
def test_negative_truncation_everywhere(tmp_path: Path) -> None:
    path = tmp_path / "cut.chpt"
    with new_file(path, 3, max_pages=4) as cf:
        header = cf.header
    for cut in range(os.path.getsize(path) - 1, -1, -1):
        os.truncate(path, cut)
        _check_cut(path, cut, header)


@pytest.fixture(scope="module")
def flip_base(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[bytes, ContainerHeader, ContainerHeader]:
    """Bytes of a three-increment file, its header, and the header in its older slot."""
    path = tmp_path_factory.mktemp("flip") / "base.chpt"
    with new_file(path, 3) as cf:
        header = cf.header
    data = path.read_bytes()
    older = _current_slot(header) ^ 1
    return data, header, decode_header_slot(data[older * SLOT : (older + 1) * SLOT])


def _current_slot(header: ContainerHeader) -> int:
    # create writes sequence 1 to slot 0 and 0 to slot 1; appends then alternate
    return 0 if header.sequence % 2 else 1


def _regions(data: bytes, header: ContainerHeader) -> Iterator[tuple[str, int, int]]:
    """(what, start, end) of every part of a file: slots, their padding, each increment's pieces."""
    current = _current_slot(header)
    for slot in (0, 1):
        used = _used(data[slot * SLOT:])
        name = "current" if slot == current else "older"
        yield f"{name} slot", slot * SLOT, slot * SLOT + used
        yield "slot padding", slot * SLOT + used, (slot + 1) * SLOT
    previous = SPEC.DATA_START
    for info in header.increments:
        yield "gap", previous, info.stream_offset
        yield "stream", info.stream_offset, info.index_offset
        yield f"index {info.index}", info.index_offset, info.index_offset + info.index_length
        if info.stats_length:
            yield f"stats {info.index}", info.stats_offset, info.end
        previous = info.end


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_negative_byte_flips(
    flip_base: tuple[bytes, ContainerHeader, ContainerHeader],
    tmp_path_factory: pytest.TempPathFactory,
    data: st.DataObject,
) -> None:
    """A flipped byte is found (FormatError) where metadata is, and harmless where it is not."""
    base, header, older = flip_base
    regions = [r for r in _regions(base, header) if r[2] > r[1]]
    name, start, end = data.draw(st.sampled_from(regions), label="region")
    offset = data.draw(st.integers(start, end - 1), label="offset")
    mask = data.draw(st.integers(1, 255), label="xor")
    note(f"flip 0x{mask:02x} at {offset} in {name}")
    flipped = bytearray(base)
    flipped[offset] ^= mask
    path = tmp_path_factory.mktemp("flipped") / "f.chpt"
    path.write_bytes(flipped)
    result = outcome(path)
    if name == "current slot":
        # indistinguishable from a torn header write: the older slot is used
        assert isinstance(result, ContainerHeader) and result == older
        assert result.increments == header.increments[:-1]
        with CheckpointFile.open(path) as cf:
            assert f"slot {_current_slot(header)}" in (cf.rejected_slot or "")
    elif name.startswith(("index", "stats")):
        assert isinstance(result, FormatError)
        assert result.increment == int(name.split()[1])
    else:
        assert result == header  # unused bytes, the older slot, or stream bytes (no stream CRC)


INCREMENT_FIELDS = [name for name in IncrementInfo.__dataclass_fields__ if name != "kind"]


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_negative_hostile_header_with_valid_crc(
    flip_base: tuple[bytes, ContainerHeader, ContainerHeader],
    tmp_path_factory: pytest.TempPathFactory,
    data: st.DataObject,
) -> None:
    """A header someone forged (sound CRCs, lying fields): FormatError or a file that holds up."""
    base, header, _ = flip_base
    number = data.draw(st.integers(0, len(header.increments) - 1), label="increment")
    field = data.draw(st.sampled_from(INCREMENT_FIELDS), label="field")
    value = data.draw(st.integers(-1, 2**64 - 1) | st.integers(0, len(base) + 10), label="value")
    change: dict[str, Any] = {field: value}
    forged_info = replace(header.increments[number], **change)
    forged = replace(header, increments=header.increments[:number] + (forged_info,)
                     + header.increments[number + 1:])
    try:
        slot = encode_header_slot(forged)
    except FormatError:
        assume(False)  # does not fit its field: cannot be written at all
    image = bytearray(base)
    current = _current_slot(header) * SLOT
    image[current : current + SLOT] = slot.ljust(SLOT, b"\0")
    path = tmp_path_factory.mktemp("forged") / "f.chpt"
    path.write_bytes(image)
    result = outcome(path)  # FormatError, or read completely without another exception
    if isinstance(result, ContainerHeader):
        assert result == forged


# ----- crash safety ---------------------------------------------------------------------------


class RecordingOs:
    """``os`` for the container module, logging every change to the file it makes."""

    def __init__(self, log: list[tuple[Any, ...]]) -> None:
        self.log = log

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def pwrite(self, fd: int, data: Any, offset: int) -> int:
        self.log.append(("pwrite", bytes(data), offset))
        return os.pwrite(fd, data, offset)

    def ftruncate(self, fd: int, length: int) -> None:
        self.log.append(("truncate", length))
        os.ftruncate(fd, length)

    def fsync(self, fd: int) -> None:
        self.log.append(("fsync",))
        os.fsync(fd)


def _apply(image: bytearray, op: tuple[Any, ...], part: slice | None = None) -> None:
    if op[0] == "pwrite":
        data, offset = op[1], op[2]
        piece = range(len(data))[part] if part else range(len(data))
        if len(piece):
            lo, hi = piece.start, piece.stop
            if len(image) < offset + hi:
                image.extend(bytes(offset + hi - len(image)))
            image[offset + lo : offset + hi] = data[lo:hi]
    elif op[0] == "truncate":
        del image[op[1]:]
        image.extend(bytes(op[1] - len(image)))


def test_crash_at_every_step_of_an_append(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Replay an append's writes one by one, and each write torn, as a crash would leave them."""
    path = tmp_path / "crash.chpt"
    with new_file(path, 2) as cf:
        before_header = cf.header
        before = path.read_bytes()
        log: list[tuple[Any, ...]] = []
        recorder = RecordingOs(log)
        monkeypatch.setattr(container, "os", recorder)
        with cf.begin_increment("incremental") as writer:
            fake = fake_increment(writer.index, writer.stream_offset)
            recorder.pwrite(cf.fd, fake.payload, writer.stream_offset)  # the caller's stream
            writer.commit(stream_length=len(fake.payload), page_runs=fake.runs, pages=fake.pages,
                          zero_pages=fake.zero_pages, stats=fake.stats)
        monkeypatch.undo()
        after_header = cf.header
        assert [op[0] for op in log].count("fsync") == 2
    states: list[tuple[int, str, bytes]] = []
    image = bytearray(before)
    for step, op in enumerate(log):
        if op[0] == "pwrite":
            n = len(op[1])
            for name, part in [("first half", slice(0, n // 2)), ("last half", slice(n // 2, n)),
                               ("all but last byte", slice(0, n - 1)),
                               ("one sector", slice(0, 512))]:
                torn = bytearray(image)
                _apply(torn, op, part)
                states.append((step, f"step {step} {op[0]}, {name}", bytes(torn)))
        _apply(image, op)
        states.append((step, f"after step {step} {op[0]}", bytes(image)))
    header_written = max(
        i for i, op in enumerate(log) if op[0] == "pwrite" and op[2] < SPEC.DATA_START
    )
    check_path = tmp_path / "state.chpt"
    for number, (step, label, state) in enumerate(states):
        check_path.write_bytes(state)
        with CheckpointFile.open(check_path) as reopened:
            got = reopened.header.increments
            if step < header_written:
                assert got == before_header.increments, label
            elif step > header_written or label.startswith("after"):
                assert got == after_header.increments, label
            else:  # a torn header write: the old state, unless the part written was all of it
                assert got in (before_header.increments, after_header.increments), label
            assert_increments_intact(reopened)
        # the next append works from whatever state the crash left
        with CheckpointFile.open(check_path, writable=True) as reopened:
            append_fake(reopened)
        with CheckpointFile.open(check_path) as reopened:
            assert_increments_intact(reopened)
    assert number > 10


CHILD_MAX_PAGES = 40
CHILD = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("container_test", sys.argv[1])
module = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = module  # dataclasses look their module up there
spec.loader.exec_module(module)
module.child_append_loop(sys.argv[2])
"""


def child_append_loop(path: str) -> None:
    """Run in a child process: append fake increments forever, saying each one committed."""
    with CheckpointFile.open(path, writable=True) as cf:
        print("ready", flush=True)
        while len(cf.header.increments) < cf.max_increments - 1:
            info = append_fake(cf, max_pages=CHILD_MAX_PAGES)
            print(info.index, flush=True)
        time.sleep(60)


def test_crash_safety_sigkill(tmp_path: Path) -> None:
    """Kill a process that appends in a loop at random instants: what it committed survives."""
    path = tmp_path / "killed.chpt"
    new_file(path, 0).close()
    rng = random.Random(1234)
    committed = -1
    kills = 0
    for _ in range(6):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, __file__, str(path)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.15))
        child.send_signal(signal.SIGKILL)
        out, _ = child.communicate()
        kills += child.returncode == -signal.SIGKILL
        reported = [int(line) for line in out.split()]
        committed = max([committed, *reported])
        with CheckpointFile.open(path) as cf:
            count = len(cf.header.increments)
            # the commit may have landed just before the kill, before the child said so
            assert committed + 1 <= count <= committed + 2
            committed = count - 1
            assert_increments_intact(cf, CHILD_MAX_PAGES)
    assert kills >= 5
    assert committed >= 1


# ----- packaging -------------------------------------------------------------------------------


def test_spec_loaded_once() -> None:
    assert load_spec() is load_spec()
    assert load_spec.cache_info().currsize == 1
    assert SPEC.__file__ is not None and SPEC.__file__.endswith("chpt.construct.py")
