"""The built-in page encoders (:class:`~pyvmm.migration.seams.PageEncoder`) and single-page helpers.

* ``plain``: QEMU's own records, a ZERO record for an all-zero page and a PAGE record for the
  rest; what QEMU's loader and ``analyze-migration.py`` read (the default).
* ``zstd``: the ``compress`` capability. A page that zstd shrinks to at most 3/4 of its size is
  written as pyvmm's compressed record (flag 0x400: ``be16 length`` + one zstd frame, see
  ``formats/chpt.construct.py``); zero pages stay ZERO records, pages that do not shrink stay
  PAGE records. QEMU's own compressed record (0x100) is zlib, slower to inflate and gone from
  QEMU 9.1, so pyvmm's record has a flag of its own; a file holding one is pyvmm's to reload
  (``checkpoint export`` says so). Compression and decompression run in C (``compress.c``,
  libzstd), never a Python call per page.

The level is QEMU's ``compress-level`` parameter (``--compress-level``): zstd's levels, 1 by
default (negative levels are faster and compress less).
"""

from __future__ import annotations

from pyvmm._native import ffi, lib

from ..errors import ConfigError
from ..ram import PAGE_SIZE
from .seams import EncoderOptions, PageEncoding

#: at most this many frame bytes, else the page is written plain
COMPRESSED_MAX = 3072
DEFAULT_COMPRESS_LEVEL = 1
_DEFAULTS = EncoderOptions()


def check_level(level: int) -> int:
    """``level`` if zstd has it (and it is not 0, zstd's "default"), else ConfigError."""
    if isinstance(level, bool) or not isinstance(level, int) or not lib.pyvmm_level_valid(level):
        raise ConfigError(f"compress level {level!r} is not a zstd level (1..19 or a negative "
                          f"one for speed; 1 is the default)")
    return level


class PlainEncoder:
    """QEMU's records: ZERO for an all-zero page, PAGE for the others (the default)."""

    name = "plain"

    def __init__(self, options: EncoderOptions = _DEFAULTS) -> None:
        if options.compress_level is not None:
            raise ConfigError("the plain encoder compresses nothing: a compress level needs "
                              "the compress capability (--compress or --encoder zstd)")

    def encoding(self) -> PageEncoding:
        return PageEncoding()


class ZstdEncoder:
    """zstd-compressed page records (the compress capability); zero pages stay ZERO records."""

    name = "zstd"

    def __init__(self, options: EncoderOptions = _DEFAULTS) -> None:
        level = options.compress_level
        self.level = DEFAULT_COMPRESS_LEVEL if level is None else check_level(level)

    def encoding(self) -> PageEncoding:
        return PageEncoding(compress_level=self.level)


def inflate_page(frame: bytes, dst: memoryview) -> bool:
    """Inflate one compressed record's frame into the page ``dst``; False if it is no
    compressed page (bad length, bad frame, not exactly one page)."""
    if not 0 < len(frame) <= COMPRESSED_MAX or len(dst) != PAGE_SIZE:
        return False
    out = ffi.from_buffer(dst, require_writable=True)
    return int(lib.pyvmm_page_inflate(frame, len(frame), out)) == 0
