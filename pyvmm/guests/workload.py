"""The built-in default workload: options, assembly of workload.S, and a Python model of its output.

The guest is a bare-metal ARM64 program (``workload.S`` beside this file) that dirties a working set
of guest RAM with a chosen pattern and rate, prints progress on the PL011 UART, prints a checksum of
the working set and powers off through PSCI SYSTEM_OFF. It is what ``python -m pyvmm run`` runs when
no other guest is named, and what researchers tune to get a given dirty rate.

Entry contract (the machine loads ``GuestImage.code`` at ``load_gpa`` and starts at ``entry``, EL1,
MMU off, with ``GuestImage.registers`` set):

====  ========================================================================================
x0    working-set base address: RAM base + 1 MiB (the image and its stack stay below it)
x1    working-set size in 4 KiB pages
x2    pattern id, the index in :data:`PATTERNS` (0 loop, 1 sequential, 2 random, 3 hotcold,
      4 increment)
x3    passes (0 = run forever)
x4    64-bit PRNG seed (xorshift64*)
x5    bytes written per page touch (multiple of 8, 8..4096)
x6    hot-set size, percent of the working set (hotcold)
x7    print a progress line every N passes (0 = none)
x8    chance in percent that a hotcold touch goes to the hot set
x9    ask the host for a checkpoint after every N passes (0 = never)
====  ========================================================================================

The run is a pure function of these registers (no counters are read), so :func:`expected_output`
and :func:`expected_checksum` can predict the UART bytes and the final checksum exactly.  With
``checkpoint_every`` the guest asks for its own checkpoints through the guest-inform device and
polls until the host has answered; done or failed, after one poll or many, it goes on the same,
so only its instruction count depends on the host.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from pyvmm.errors import ConfigError, GuestError

PAGE_SIZE = 4096
RAM_BASE = 0x4000_0000
DEFAULT_RAM_SIZE = 256 * 1024 * 1024
# The working set starts this far into RAM; the image and the stack (which grows down from the
# working-set base) live in the gap, so it must stay far larger than the assembled image.
WORKING_SET_OFFSET = 1024 * 1024
# Room kept for the guest's stack between the image and the working set.
_STACK_RESERVE = 64 * 1024

# Pattern names; a pattern's id (register x2) is its index here.
PATTERNS: tuple[str, ...] = ("loop", "sequential", "random", "hotcold", "increment")

_MASK64 = (1 << 64) - 1
# Constants shared with workload.S; changing one here means changing it there.
_SEED_MIX = 0x9E3779B97F4A7C15
_XORSHIFT_MULTIPLIER = 0x2545F4914F6CDD1D
_CHECKSUM_MULTIPLIER = 0x100000001B3
_LINE_PREFIX = b"pyvmm-workload: "

_SIZE_SUFFIXES: Mapping[str, int] = MappingProxyType({"K": 1 << 10, "M": 1 << 20, "G": 1 << 30})
_SIZE_PATTERN = re.compile(r"(.+?)([KMG])(?:I?B)?", re.IGNORECASE)

# Option keys as a user writes them, and the field each sets (the field names work as keys too).
_KEY_FIELDS: Mapping[str, str] = MappingProxyType({
    "pattern": "pattern",
    "working_set": "working_set",
    "passes": "passes",
    "touch": "touch_bytes",
    "hot": "hot_percent",
    "chance": "hot_chance",
    "report": "report_every",
    "seed": "seed",
    "checkpoint_every": "checkpoint_every",
})
_FIELD_KEYS: Mapping[str, str] = MappingProxyType({field: key for key, field in _KEY_FIELDS.items()})
_SIZE_KEYS = frozenset({"working_set", "touch"})


@dataclass(frozen=True)
class WorkloadOptions:
    """What the built-in workload does; every field is checked when the object is made.

    ``working_set`` and ``touch_bytes`` are in bytes. ``seed`` is normally the machine's ``--seed``.
    """

    pattern: str = "sequential"
    working_set: int = 64 * 1024 * 1024
    # Sized so the default `pyvmm run` ends in a few seconds: measured under raw unicorn (2 shared
    # cores, noisy), a sequential pass over 64 MiB at touch=64 costs 12-20 ms, plus ~0.2 s fixed
    # (first touch of host pages, final checksum), so 128 passes take 2-2.5 s.
    passes: int = 128
    touch_bytes: int = 64
    hot_percent: int = 10
    report_every: int = 16
    seed: int = 0
    hot_chance: int = 90
    checkpoint_every: int = 0

    def __post_init__(self) -> None:
        if self.pattern not in PATTERNS:
            raise ConfigError(
                f"workload option 'pattern': {self.pattern!r} is not one of {', '.join(PATTERNS)}"
            )
        if self.working_set <= 0 or self.working_set % PAGE_SIZE:
            raise ConfigError(
                f"workload option 'working_set': {self.working_set} is not a positive multiple of "
                f"{PAGE_SIZE} bytes (sizes take K, M, G suffixes)"
            )
        _check_range("passes", self.passes, 0, _MASK64, "0 = forever")
        if self.touch_bytes % 8 or not 8 <= self.touch_bytes <= PAGE_SIZE:
            raise ConfigError(
                f"workload option 'touch': {self.touch_bytes} is not a multiple of 8 in 8..{PAGE_SIZE}"
            )
        _check_range("hot", self.hot_percent, 1, 100, "percent of the working set")
        _check_range("chance", self.hot_chance, 0, 100, "percent of hotcold touches that go hot")
        _check_range("report", self.report_every, 0, _MASK64, "0 = no progress lines")
        _check_range("seed", self.seed, 0, _MASK64, "an unsigned 64-bit integer")
        _check_range("checkpoint_every", self.checkpoint_every, 0, _MASK64,
                     "passes between the guest's own checkpoint requests, 0 = none")

    @classmethod
    def parse(cls, text: str, base: WorkloadOptions | None = None) -> WorkloadOptions:
        """Options from ``"key=value,key=value"`` over ``base`` (the defaults if None).

        Sizes (``working_set``, ``touch``) accept K/M/G suffixes (powers of 1024). Raises
        ConfigError naming the key and what it allows for an unknown key or a bad value.
        """
        changes: dict[str, object] = {}
        for item in text.split(","):
            item = item.strip()
            if not item:
                continue
            key, sep, value = item.partition("=")
            key, value = key.strip().replace("-", "_"), value.strip()
            field = _KEY_FIELDS.get(key) or (key if key in _FIELD_KEYS else None)
            if field is None:
                raise ConfigError(
                    f"unknown workload option {key!r} (allowed: {', '.join(_KEY_FIELDS)})"
                )
            if not sep or not value:
                raise ConfigError(f"workload option {key!r} needs a value: {key}=VALUE")
            if field == "pattern":
                changes[field] = value.lower()
            else:
                changes[field] = _parse_int(_FIELD_KEYS[field], value)
        return dataclasses.replace(base if base is not None else cls(), **changes)  # type: ignore[arg-type]

    def to_text(self) -> str:
        """The ``key=value,...`` form that :meth:`parse` reads back to an equal object."""
        return ",".join(
            f"{_FIELD_KEYS[field.name]}={getattr(self, field.name)}"
            for field in dataclasses.fields(self)
        )

    @property
    def pages(self) -> int:
        """Working-set size in pages."""
        return self.working_set // PAGE_SIZE

    @property
    def pattern_id(self) -> int:
        """The id the guest receives in x2."""
        return PATTERNS.index(self.pattern)

    @property
    def hot_pages(self) -> int:
        """Pages in the hot set (hotcold), computed exactly as the guest does."""
        return max(1, self.pages * self.hot_percent // 100)

    def validate(self, ram_size: int) -> None:
        """Raise ConfigError unless the working set fits in ``ram_size`` bytes of RAM after the image."""
        room = ram_size - WORKING_SET_OFFSET
        if self.working_set > room:
            raise ConfigError(
                f"workload option 'working_set': {_format_size(self.working_set)} does not fit in "
                f"{_format_size(ram_size)} of RAM after the {_format_size(WORKING_SET_OFFSET)} kept "
                f"for the image (at most {_format_size(max(room, 0))})"
            )


WORKLOAD_HELP = f"""\
Built-in workload options: --workload KEY=VALUE[,KEY=VALUE...]
  pattern=NAME      {' | '.join(PATTERNS)} (default sequential)
                      loop        arithmetic only, touches no memory (pages*touch/8 steps a pass)
                      sequential  touch every page in order
                      random      touch `pages` uniformly random pages a pass
                      hotcold     like random, but `chance`% of touches go to the hot set
                      increment   add 1 to the first byte of every page in turn
  working_set=SIZE  bytes of RAM the guest dirties, K/M/G suffixes (default 64M)
  passes=N          passes over the working set, 0 = forever (default 128)
  touch=SIZE        bytes written per page touch, multiple of 8 in 8..4096 (default 64)
  hot=PERCENT       hot-set size for hotcold, 1..100 (default 10)
  chance=PERCENT    share of hotcold touches that hit the hot set, 0..100 (default 90)
  report=N          print a progress line every N passes, 0 = never (default 16)
  seed=N            PRNG seed (default: the machine's --seed)
  checkpoint_every=N  ask the host for a checkpoint after every N passes, through the
                    guest-inform device, and wait for its answer; 0 = never (default 0)
The guest prints "pyvmm-workload: done passes=N checksum=0x..." and powers off when done.
"""


@dataclass(frozen=True)
class GuestImage:
    """A bare-metal program ready to load: bytes at ``load_gpa``, start at ``entry`` with ``registers``.

    ``registers`` is keyed by unicorn ARM64 register names in lower case (``"x0"``).
    """

    code: bytes
    load_gpa: int
    entry: int
    registers: dict[str, int]


def workload_source() -> str:
    """The assembly source of the workload, as packaged."""
    return importlib.resources.files("pyvmm.guests").joinpath("workload.S").read_text("utf-8")


@functools.cache
def assemble_workload(load_gpa: int = RAM_BASE) -> bytes:
    """Machine code of workload.S assembled for ``load_gpa``; cached, since it never changes in a process.

    Raises GuestError if keystone rejects the source (a bug in the packaged file, not user input).
    """
    # Imported here, not at the top: loading keystone's native library is only worth it when a
    # workload is actually built (not for `--help` or option parsing).
    from keystone import KS_ARCH_ARM64, KS_MODE_LITTLE_ENDIAN, Ks, KsError

    try:
        encoding, _count = Ks(KS_ARCH_ARM64, KS_MODE_LITTLE_ENDIAN).asm(workload_source(), load_gpa)
    except KsError as err:
        raise GuestError(f"cannot assemble workload.S: {err}", guest="workload") from err
    if not encoding:
        raise GuestError("assembling workload.S gave no code", guest="workload")
    return bytes(encoding)


def build_workload(
    options: WorkloadOptions, ram_base: int = RAM_BASE, ram_size: int = DEFAULT_RAM_SIZE
) -> GuestImage:
    """The workload image and entry registers for a machine with RAM at ``ram_base``.

    Raises ConfigError if the working set does not fit in ``ram_size``.
    """
    options.validate(ram_size)
    code = assemble_workload(ram_base)
    if len(code) + _STACK_RESERVE > WORKING_SET_OFFSET:
        raise GuestError(
            f"workload image of {len(code)} bytes leaves no room for its stack", guest="workload"
        )
    registers = {
        "x0": ram_base + WORKING_SET_OFFSET,
        "x1": options.pages,
        "x2": options.pattern_id,
        "x3": options.passes,
        "x4": options.seed,
        "x5": options.touch_bytes,
        "x6": options.hot_percent,
        "x7": options.report_every,
        "x8": options.hot_chance,
        "x9": options.checkpoint_every,
    }
    return GuestImage(code=code, load_gpa=ram_base, entry=ram_base, registers=registers)


def expected_output(options: WorkloadOptions) -> bytes:
    """The exact bytes the guest writes to the UART for ``options`` (which must end: passes > 0)."""
    checksum = expected_checksum(options)
    name, pages, passes = options.pattern, options.pages, options.passes
    lines = [f"start pattern={name} pages={pages} passes={passes} touch={options.touch_bytes}"]
    report, every = options.report_every, options.checkpoint_every
    for done in _passes_with_lines(options):
        if report and done % report == 0:
            lines.append(f"pass {done}/{passes} pattern={name} pages={pages}")
        if every and done % every == 0:
            lines.append(f"checkpoint after pass {done}")
    lines.append(f"done passes={passes} checksum=0x{checksum:016x}")
    return b"".join(_LINE_PREFIX + line.encode() + b"\n" for line in lines)


def _passes_with_lines(options: WorkloadOptions) -> list[int]:
    """The pass numbers after which the guest prints a progress or checkpoint line, in order."""
    done: set[int] = set()
    for interval in (options.report_every, options.checkpoint_every):
        if interval:
            done.update(range(interval, options.passes + 1, interval))
    return sorted(done)


def expected_checksum(options: WorkloadOptions) -> int:
    """The checksum the guest prints at the end, computed by a plain Python model of the guest.

    Runs in time proportional to the pages touched over all passes (seconds for the 64 MiB
    default); meant for tests with small working sets. Raises ConfigError if passes is 0.
    """
    if options.passes == 0:
        raise ConfigError("workload option 'passes': 0 runs forever, so there is no final checksum")
    if options.pattern == "loop":
        return _loop_sum(options)
    words = expected_words(options)
    total = options.pages * (PAGE_SIZE // 8)
    checksum = 0
    for index, value in words.items():
        checksum += value * pow(_CHECKSUM_MULTIPLIER, total - 1 - index, 1 << 64)
    return checksum & _MASK64


def expected_words(options: WorkloadOptions) -> dict[int, int]:
    """Final nonzero 64-bit words of the working set after all passes, by word index (model).

    RAM starts zeroed; words not in the result are zero. "loop" leaves it all zero.
    """
    words_per_touch = options.touch_bytes // 8
    words: dict[int, int] = {}
    if options.pattern == "loop":
        return words
    if options.pattern == "increment":
        value = options.passes & 0xFF
        return {page * (PAGE_SIZE // 8): value for page in range(options.pages)} if value else {}
    last_pass = _last_pass_per_page(options)
    for page, done in last_pass.items():
        tag = (done << 48 | page << 12) & _MASK64
        first = page * (PAGE_SIZE // 8)
        for word in range(words_per_touch):
            words[first + word] = tag + 8 * word
    return words


def _last_pass_per_page(options: WorkloadOptions) -> dict[int, int]:
    """For each touched page, the 1-based number of the last pass that touched it (model)."""
    pages, passes = options.pages, options.passes
    if options.pattern == "sequential":
        return dict.fromkeys(range(pages), passes)
    state = _seed_state(options.seed)
    hot, cold = options.hot_pages, options.pages - options.hot_pages
    last: dict[int, int] = {}
    for done in range(1, passes + 1):
        for _ in range(pages):
            if options.pattern == "random":
                state = _xorshift(state)
                last[_umulh(state * _XORSHIFT_MULTIPLIER & _MASK64, pages)] = done
                continue
            state = _xorshift(state)
            percent = _umulh(state * _XORSHIFT_MULTIPLIER & _MASK64, 100)
            state = _xorshift(state)
            draw = state * _XORSHIFT_MULTIPLIER & _MASK64
            if cold == 0 or percent < options.hot_chance:
                last[_umulh(draw, hot)] = done
            else:
                last[hot + _umulh(draw, cold)] = done
    return last


def _loop_sum(options: WorkloadOptions) -> int:
    """Sum of the xorshift states the loop pattern steps through (model)."""
    state, total = _seed_state(options.seed), 0
    for _ in range(options.passes * options.pages * (options.touch_bytes // 8)):
        state = _xorshift(state)
        total += state
    return total & _MASK64


def _seed_state(seed: int) -> int:
    state = seed ^ _SEED_MIX
    # xorshift is stuck at 0 forever; the guest maps that one seed to state 1 as well.
    return state or 1


def _xorshift(state: int) -> int:
    state ^= state >> 12
    state ^= (state << 25) & _MASK64
    state ^= state >> 27
    return state


def _umulh(a: int, b: int) -> int:
    return (a * b) >> 64


def _check_range(key: str, value: int, low: int, high: int, meaning: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        upper = "2**64-1" if high == _MASK64 else str(high)
        raise ConfigError(f"workload option {key!r}: {value!r} is not in {low}..{upper} ({meaning})")


def _parse_int(key: str, text: str) -> int:
    """An integer option value (decimal or 0x hex); sizes may end in K/M/G, optionally + "B"/"iB"."""
    digits, scale = text, 1
    if key in _SIZE_KEYS:
        sized = _SIZE_PATTERN.fullmatch(text)
        if sized:
            digits, scale = sized.group(1), _SIZE_SUFFIXES[sized.group(2).upper()]
    try:
        return int(digits, 0) * scale
    except ValueError as err:
        kind = "a size such as 4096, 64K or 16M" if key in _SIZE_KEYS else "an integer"
        raise ConfigError(f"workload option {key!r}: {text!r} is not {kind}") from err


def _format_size(size: int) -> str:
    for suffix, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale and size % scale == 0:
            return f"{size // scale} {suffix}"
    return f"{size} bytes"
