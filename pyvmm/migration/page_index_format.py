"""An increment's page index blob: encoded, decoded and checked against the header.

The index says which guest pages the increment holds and where. It is built and parsed by the
declaration in ``formats/chpt.construct.py`` (the reference, and the error messages) or, for the
common case, by struct with the same bytes (an index may hold a run per guest page); a property
test holds the two equal. Decoders take bytes that may be hostile and answer with page runs or a
:class:`~pyvmm.errors.FormatError`, nothing else. No I/O.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Sequence

from pyvmm.errors import FormatError
from pyvmm.migration.container_format import (
    INDEX_RECORD,
    PAGE_RECORD_HEADER,
    ContainerHeader,
    IncrementInfo,
    IndexRecords,
    PageRun,
    construct_call,
    load_spec,
)


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
    packed_flag: int = spec.RUN_COMPRESSED
    pack = INDEX_RECORD.pack
    try:
        body = b"".join([_PAGE_INDEX_HEAD.pack(spec.PAGE_INDEX_MAGIC, increment, len(runs)),
                         *[pack(run.block, zero_flag if run.zero else
                                packed_flag if run.compressed else 0, 0, run.npages,
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
                "flags": spec.RUN_ZERO if run.zero else
                spec.RUN_COMPRESSED if run.compressed else 0,
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
#: layout as the declaration's PageIndex, which stays the reference: see _decode_page_index_fast;
#: the runs are container_format's INDEX_RECORD).
_PAGE_INDEX_HEAD = struct.Struct(">4sII")
_PAGE_INDEX_CRC = struct.Struct(">I")


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
    expected = _PAGE_INDEX_HEAD.size + count * INDEX_RECORD.size + _PAGE_INDEX_CRC.size
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
            head + count * INDEX_RECORD.size != body_end:
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
    head, run_size = _PAGE_INDEX_HEAD.size, INDEX_RECORD.size
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
    packed_flag: int = spec.RUN_COMPRESSED
    runs = []
    for block, flags, reserved, npages, first_page, data_offset in INDEX_RECORD.iter_unpack(
        view[head:body_end]
    ):
        if reserved or flags & ~known or flags == known:
            return None
        runs.append(PageRun(block, first_page, npages, data_offset, bool(flags & zero_flag),
                            bool(flags & packed_flag)))
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
    packed_flag: int = spec.RUN_COMPRESSED
    runs = []
    # item access, not construct's slow attribute access: an index may hold a run per page
    for raw in fields["runs"]:
        flags = raw["flags"]
        if flags & ~known:
            raise FormatError(
                f"page run has unknown flags 0x{flags:x}", offset=offset, increment=increment
            )
        if flags == known:
            raise FormatError("page run is marked both zero and compressed", offset=offset,
                              increment=increment)
        runs.append(
            PageRun(
                raw["block"],
                raw["first_page"],
                raw["npages"],
                raw["data_offset"],
                bool(flags & zero_flag),
                bool(flags & packed_flag),
            )
        )
    return runs


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
            elif run.compressed:
                if stream_offset <= run.data_offset < stream_end:
                    pages += run.npages
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
        elif run.compressed:
            raise bad(f"compressed records at 0x{run.data_offset:x} lie outside the stream "
                      f"0x{info.stream_offset:x}..0x{stream_end:x}")
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
