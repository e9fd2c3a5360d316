"""A hypothesis state machine that checks a checkpoint algorithm against a plain model of guest RAM.

:func:`checkpoint_state_machine` builds a :class:`CheckpointMachine` class for one configuration
of :class:`~pyvmm.migration.checkpoint.Checkpointer` (capabilities, dirty tracker, RAM size).  Its
rules write guest RAM from the host (``write_memory``, a ``memoryview``, the kernel through
``preadv``) and from the vCPU (a store snippet run for an exact instruction count), take
checkpoints of the stopped machine or while the guest runs a loop storing into every page (the
live case: the checkpoint must hold RAM as it was at its pause), and reload the first k of them
into a fresh machine, comparing with the model:

* the model is a dict ``region page -> 4 KiB`` (absent = zero) of a small working region, the
  bytes of the code page, and the registers the last snippet left (``x0``, ``x1``, ``pc``);
* a checkpoint snapshots the model; reloading ``chpt:k:FILE`` must give snapshot ``k-1`` exactly,
  with every RAM page outside the region and code page zero (DESIGN.md §9);
* each increment's page index must hold every page whose content changed since the previous
  checkpoint, and the stats the checkpointer returned must agree with the file.

Plugging in another algorithm: a tracker or saver known to :mod:`pyvmm.migration.algorithms` (a
name or ``module:attribute``) needs only ``checkpoint_state_machine(..., tracker=..., saver=...)``
(the ``pytest --pyvmm-algorithm`` plugin, :mod:`pyvmm.testing.pytest_plugin`, does that for you).
Anything else: subclass the generated class and override :meth:`make_checkpointer` (anything with
``checkpoint() -> CheckpointStats`` and ``close()``), or :meth:`take_checkpoint` for finer
control; :meth:`reload_checkpoint` and :meth:`expected_kind` are the other hooks.  Run it with
``TestX = MyMachine.TestCase`` and ``TestX.settings = profile_settings()``.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar, Protocol

from hypothesis import HealthCheck, Phase, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from ..machine import RAM_BASE, Machine, StopReason
from ..migration.checkpoint import Checkpointer, CheckpointStats, reload
from ..migration.container import CheckpointFile
from ..ram import PAGE_SIZE
from .strategies import (
    REGION_PAGES,
    GuestStore,
    guest_stores,
    page_writes,
    region_pages,
)

#: RAM page (of the main block) holding the store snippets; outside the modelled region.
CODE_PAGE = 0
#: First RAM page of the modelled working region.
REGION_FIRST_PAGE = 16
#: Instructions in every store snippet: movz+movk for the address, movz+3 movk for the value, str.
SNIPPET_INSNS = 7
#: The host-side ways of writing guest RAM the ``host_write`` rule draws from.
HOST_WRITERS = ("write_memory", "memoryview", "kernel")

_STR_OPCODES = {1: 0x3900_0000, 2: 0x7900_0000, 4: 0xB900_0000, 8: 0xF900_0000}
#: Where in the code page the endless loop of :meth:`CheckpointMachine.checkpoint_running` lives.
LOOP_OFFSET = 0x800
#: x0 = region base + byte offset, x2 = counter, x3 = 0; stores x2+1, x2+2, ... at that byte of
#: every region page in turn, forever (the ``and`` mask assumes a 16-page region).
LOOP_CODE = b"".join(word.to_bytes(4, "little") for word in (
    0x9100_0442,  # loop: add x2, x2, #1
    0xF823_6802,  #       str x2, [x0, x3]
    0x9140_0463,  #       add x3, x3, #1, lsl #12
    0x9240_3C63,  #       and x3, x3, #0xffff
    0x17FF_FFFC,  #       b loop
))


class CheckpointAlgorithm(Protocol):
    """What the state machine needs of a checkpointer."""

    def checkpoint(self) -> CheckpointStats: ...

    def close(self) -> None: ...


def _mov64(register: int, value: int) -> list[int]:
    # movz xR, #h0 ; movk xR, #hN, lsl #16*N — always all four halfwords, so the count is fixed
    words = [0xD280_0000 | (value & 0xFFFF) << 5 | register]
    for hw in range(1, 4):
        words.append(0xF280_0000 | hw << 21 | ((value >> (16 * hw)) & 0xFFFF) << 5 | register)
    return words


def encode_store(address: int, value: int, size: int) -> bytes:
    """ARM64 code storing the low ``size`` bytes of ``value`` at ``address`` (x0 = address,
    x1 = value): exactly :data:`SNIPPET_INSNS` instructions, for an address below 4 GiB."""
    if address >> 32:
        raise ValueError(f"snippet address 0x{address:x} does not fit in 32 bits")
    address_words = _mov64(0, address)[:2]
    words = [*address_words, *_mov64(1, value), _STR_OPCODES[size] | 0 << 5 | 1]
    assert len(words) == SNIPPET_INSNS
    return b"".join(w.to_bytes(4, "little") for w in words)


#: The hypothesis profiles of :func:`profile_settings`, and what each is for.
PROFILES = {
    "ci": "small, fast and derandomized: the same examples on every run (the default); a "
          "failure is shrunk, the first one found only",
    "long": "a long local run for hunting bugs: 200 examples of 50 steps, the example database "
            "on (a failure found is tried first next time)",
    "dev": "the long run's former name",
}


def profile_settings(name: str | None = None) -> settings:
    """The settings of profile ``name``, one of :data:`PROFILES`: ``"ci"`` (small and fast, the
    default) or ``"long"`` (longer runs, for hunting bugs locally; ``"dev"`` is the same);
    ``PYVMM_HYPOTHESIS_PROFILE`` picks when ``name`` is None.  All are also registered with
    hypothesis under ``pyvmm-ci`` / ``pyvmm-long`` / ``pyvmm-dev``."""
    common: dict[str, Any] = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow]}
    long = settings(max_examples=200, stateful_step_count=50, **common)
    profiles = {
        # explain: slow, and it says little of a state machine's steps
        "ci": settings(max_examples=10, stateful_step_count=20, derandomize=True,
                       database=None, print_blob=True, report_multiple_bugs=False,
                       phases=[p for p in Phase if p is not Phase.explain], **common),
        "long": long,
        "dev": long,
    }
    for key, value in profiles.items():
        settings.register_profile(f"pyvmm-{key}", value)
    chosen = name or os.environ.get("PYVMM_HYPOTHESIS_PROFILE", "ci")
    if chosen not in profiles:
        raise ValueError(f"unknown hypothesis profile {chosen!r}: expected one of {list(profiles)}")
    return profiles[chosen]


class CheckpointMachine(RuleBasedStateMachine):
    """Guest RAM written by host and vCPU, checkpointed and reloaded, against a plain model.

    Class attributes configure it (set by :func:`checkpoint_state_machine`).
    """

    capabilities: ClassVar[tuple[str, ...]] = ()
    tracker: ClassVar[str] = "async"
    #: The page saver (a name in :mod:`pyvmm.migration.algorithms`); None: as the capabilities say.
    saver: ClassVar[str | None] = None
    encoder: ClassVar[str | None] = None
    ram_size: ClassVar[int] = 1 << 20
    durable: ClassVar[bool] = False
    #: Also require incremental increments to hold no page that was not written since the
    #: previous checkpoint (an efficiency property, not a correctness one).
    exact_increments: ClassVar[bool] = True

    def __init__(self) -> None:
        super().__init__()
        self.workdir = Path(tempfile.mkdtemp(prefix="pyvmm-stateful-"))
        self.path = self.workdir / "checkpoint.bin"
        self.machine = Machine(self.ram_size, name="stateful")
        # the model
        self.pages: dict[int, bytes] = {}
        self.code = bytes(PAGE_SIZE)
        self.registers: dict[str, int] = {}
        self.written: set[int] = set()  # RAM pages written since the last checkpoint
        self.snapshots: list[tuple[dict[int, bytes], bytes, dict[str, int]]] = []
        self.stats: list[CheckpointStats] = []
        self._checkpointer: CheckpointAlgorithm | None = None

    # ------------------------------------------------------------------ hooks for other algorithms
    def make_checkpointer(self) -> CheckpointAlgorithm:
        """The checkpointer under test, writing into :attr:`path` (called on first checkpoint)."""
        kwargs: dict[str, Any] = {"durable": self.durable}
        if self.capabilities or self.tracker != "async":
            kwargs.update(capabilities=self.capabilities, tracker=self.tracker)
        if self.saver is not None:
            kwargs.update(saver=self.saver)
        if self.encoder is not None:
            kwargs.update(encoder=self.encoder)
        return Checkpointer(self.machine, self.path, **kwargs)

    def take_checkpoint(self) -> CheckpointStats:
        """Take one checkpoint of :attr:`machine` (which is stopped) into :attr:`path`."""
        return self.algorithm().checkpoint()

    def algorithm(self) -> CheckpointAlgorithm:
        """The checkpointer under test, made by :meth:`make_checkpointer` on first use."""
        if self._checkpointer is None:
            self._checkpointer = self.make_checkpointer()
        return self._checkpointer

    def reload_checkpoint(self, count: int) -> Machine:
        """A new machine holding the state after the first ``count`` increments."""
        return reload(f"chpt:{count}:{self.path}")

    def expected_kind(self, index: int) -> str:
        """The kind increment ``index`` must have."""
        return "incremental" if index > 0 and "incremental" in self.capabilities else "full"

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def region_gpa(page: int) -> int:
        return RAM_BASE + (REGION_FIRST_PAGE + page) * PAGE_SIZE

    def _model_write(self, page: int, offset: int, data: bytes) -> None:
        old = self.pages.get(page, bytes(PAGE_SIZE))
        new = old[:offset] + data + old[offset + len(data):]
        if new.count(0) == PAGE_SIZE:
            self.pages.pop(page, None)
        else:
            self.pages[page] = new
        self.written.add(REGION_FIRST_PAGE + page)

    def _ram_pages(self, machine: Machine) -> dict[int, bytes]:
        out = {}
        for page in range(REGION_PAGES):
            content = machine.read_memory(self.region_gpa(page), PAGE_SIZE)
            if content.count(0) != PAGE_SIZE:
                out[page] = content
        return out

    def _increment_pages(self, container: CheckpointFile, index: int) -> set[int]:
        pages: set[int] = set()
        main_block = self.machine.ram_blocks.index(self.machine.ram)
        for run in container.page_index(index):
            if run.block == main_block:
                pages.update(range(run.first_page, run.first_page + run.npages))
        return pages

    def _check_file(self) -> None:
        """Stats agree with the file; each increment holds the pages it must (DESIGN.md §9)."""
        with CheckpointFile.open(self.path) as container:
            increments = container.header.increments
            assert len(increments) == len(self.stats)
            previous: dict[int, bytes] = {}
            previous_code = bytes(PAGE_SIZE)
            for info, stats, (pages, code, _) in zip(increments, self.stats, self.snapshots):
                assert (info.index, info.kind) == (stats.increment, stats.kind)
                assert (info.pages, info.zero_pages) == (stats.pages, stats.zero_pages), \
                    f"increment {info.index}: file says {info.pages}+{info.zero_pages} pages, " \
                    f"stats {stats.pages}+{stats.zero_pages}"
                stored = self._increment_pages(container, info.index)
                assert len(stored) == info.pages + info.zero_pages
                changed = {REGION_FIRST_PAGE + p for p in set(pages) | set(previous)
                           if pages.get(p) != previous.get(p)}
                if code != previous_code:
                    changed.add(CODE_PAGE)
                missing = changed - stored
                assert not missing, f"increment {info.index} lacks changed pages {sorted(missing)}"
                previous, previous_code = pages, code

    # ------------------------------------------------------------------ rules
    @rule(page=region_pages(), write=page_writes(), via=st.sampled_from(HOST_WRITERS))
    def host_write(self, page: int, write: tuple[int, bytes], via: str) -> None:
        offset, data = write
        gpa = self.region_gpa(page) + offset
        note(f"host writes {len(data)} bytes at page {page}+{offset} via {via}: "
             f"{data[:8].hex()}{'…' if len(data) > 8 else ''}")
        if via == "write_memory":
            self.machine.write_memory(gpa, data)
        elif via == "memoryview":
            self.machine.memory_view(gpa, len(data))[:] = data
        else:  # the kernel writes guest RAM (as a read() into a guest buffer would)
            source = self.workdir / "kernel-source"
            source.write_bytes(data)
            fd = os.open(source, os.O_RDONLY)
            try:
                assert os.preadv(fd, [self.machine.memory_view(gpa, len(data))], 0) == len(data)
            finally:
                os.close(fd)
        self._model_write(page, offset, data)

    @rule(page=region_pages())
    def zero_page(self, page: int) -> None:
        note(f"host zeroes page {page}")
        self.machine.write_memory(self.region_gpa(page), bytes(PAGE_SIZE))
        self._model_write(page, 0, bytes(PAGE_SIZE))

    @rule(store=guest_stores())
    def guest_write(self, store: GuestStore) -> None:
        gpa = self.region_gpa(store.page) + store.offset
        note(f"guest stores {store.size} bytes 0x{store.value:x} at page {store.page}"
             f"+{store.offset}")
        code_gpa = RAM_BASE + CODE_PAGE * PAGE_SIZE
        snippet = encode_store(gpa, store.value, store.size)
        self.machine.write_memory(code_gpa, snippet)
        self.machine.invalidate_code(code_gpa, PAGE_SIZE)
        self.code = snippet + self.code[len(snippet):]
        self.written.add(CODE_PAGE)
        insns = self.machine.insns
        self.machine.set_entry(code_gpa)
        result = self.machine.run(max_insns=SNIPPET_INSNS)
        assert result.reason is StopReason.INSN_LIMIT, result
        assert insns is None or result.insns == insns + SNIPPET_INSNS, result
        self._model_write(store.page, store.offset, store.value.to_bytes(store.size, "little"))
        self.registers = {"x0": gpa, "x1": store.value, "pc": code_gpa + 4 * SNIPPET_INSNS}

    @rule()
    def checkpoint(self) -> None:
        index = len(self.stats)
        stats = self.take_checkpoint()
        note(f"checkpoint {index}: {stats.kind}, {stats.pages} pages + {stats.zero_pages} zero "
             f"pages (written since the last: {sorted(self.written)})")
        assert stats.increment == index, stats
        assert stats.kind == self.expected_kind(index), stats
        if self.exact_increments and stats.kind == "incremental":
            extra = stats.pages + stats.zero_pages - len(self.written)
            assert extra <= 0, f"increment {index} holds {extra} page(s) never written"
        self.snapshots.append((dict(self.pages), self.code, dict(self.registers)))
        self.stats.append(stats)
        self.written.clear()

    @precondition(lambda self: isinstance(self.algorithm(), Checkpointer))
    @rule(offset=st.integers(0, PAGE_SIZE // 8 - 1).map(lambda i: i * 8),
          counter=st.integers(0, 2**64 - 1), warmup=st.sampled_from([0.0, 0.001, 0.01]))
    def checkpoint_running(self, offset: int, counter: int, warmup: float) -> None:
        """Checkpoint while the guest runs a loop storing into every region page: the checkpoint
        must hold RAM and CPU exactly as they were at its pause (DESIGN.md §4), however long
        saving takes and whatever the guest writes meanwhile (live mode)."""
        assert REGION_PAGES * PAGE_SIZE - 1 == 0xFFFF, "LOOP_CODE's mask is for 16 pages"
        algorithm = self.algorithm()
        assert isinstance(algorithm, Checkpointer)
        index = len(self.stats)
        note(f"guest loops storing from 0x{counter:x} at byte {offset} of every page; "
             f"checkpoint {index} taken {warmup * 1e3:g} ms after it starts")
        loop_gpa = RAM_BASE + CODE_PAGE * PAGE_SIZE + LOOP_OFFSET
        self.machine.write_memory(loop_gpa, LOOP_CODE)
        self.machine.invalidate_code(loop_gpa, len(LOOP_CODE))
        self.code = self.code[:LOOP_OFFSET] + LOOP_CODE + self.code[LOOP_OFFSET + len(LOOP_CODE):]
        self.machine.set_entry(loop_gpa, {"x0": self.region_gpa(0) + offset, "x2": counter,
                                          "x3": 0})
        at_pause: list[tuple[dict[int, bytes], dict[str, int]]] = []

        def record(machine: Machine) -> None:
            cpu = machine.cpu_state()
            at_pause.append((self._ram_pages(machine),
                             {"x0": cpu.x[0], "x1": cpu.x[1], "pc": cpu.pc}))

        algorithm.on_pause = record
        self.machine.start()
        try:
            if warmup:
                time.sleep(warmup)
            stats = self.take_checkpoint()
        finally:
            algorithm.on_pause = None
            self.machine.pause()
        note(f"checkpoint {index}: {stats.kind}, {stats.pages} pages + {stats.zero_pages} zero "
             f"pages")
        assert len(at_pause) == 1
        assert stats.increment == index and stats.kind == self.expected_kind(index), stats
        pages, registers = at_pause[0]
        self.snapshots.append((pages, self.code, registers))
        self.stats.append(stats)
        # The loop may have written any region page: the model takes what RAM holds now, and
        # every page counts as written for the next increment.
        self.pages = self._ram_pages(self.machine)
        cpu = self.machine.cpu_state()
        self.registers = {"x0": cpu.x[0], "x1": cpu.x[1], "pc": cpu.pc}
        self.written = {CODE_PAGE, *range(REGION_FIRST_PAGE, REGION_FIRST_PAGE + REGION_PAGES)}

    @precondition(lambda self: bool(self.snapshots))
    @rule(data=st.data())
    def reload_prefix(self, data: st.DataObject) -> None:
        count = data.draw(st.integers(1, len(self.snapshots)), label="increments to reload")
        note(f"reload chpt:{count}:FILE (state at checkpoint {count - 1})")
        pages, code, registers = self.snapshots[count - 1]
        machine = self.reload_checkpoint(count)
        try:
            got = self._ram_pages(machine)
            for page in sorted(set(got) | set(pages)):
                assert got.get(page) == pages.get(page), \
                    f"reloaded page {page} differs from checkpoint {count - 1}"
            assert machine.read_memory(RAM_BASE + CODE_PAGE * PAGE_SIZE, PAGE_SIZE) == code
            outside = set(machine.ram.nonzero_pages()) - {CODE_PAGE} - set(
                range(REGION_FIRST_PAGE, REGION_FIRST_PAGE + REGION_PAGES))
            assert not outside, f"reloaded RAM pages {sorted(outside)} are not zero"
            cpu = machine.cpu_state()
            actual = {"x0": cpu.x[0], "x1": cpu.x[1], "pc": cpu.pc}
            assert all(actual[k] == v for k, v in registers.items()), (actual, registers)
        finally:
            machine.close()
        self._check_file()

    @invariant()
    def ram_matches_model(self) -> None:
        # a checkpointer must never change what the running guest sees
        assert self._ram_pages(self.machine) == self.pages

    def teardown(self) -> None:
        try:
            if self._checkpointer is not None:
                self._checkpointer.close()
            if self.stats:
                self._check_file()
        finally:
            self.machine.close()
            shutil.rmtree(self.workdir, ignore_errors=True)


def checkpoint_state_machine(capabilities: tuple[str, ...] = (), tracker: str = "async",
                             ram_size: int = 1 << 20, *, durable: bool = False,
                             base: type[CheckpointMachine] = CheckpointMachine,
                             saver: str | None = None, exact_increments: bool = True,
                             encoder: str | None = None) -> type[CheckpointMachine]:
    """A :class:`CheckpointMachine` subclass for one Checkpointer configuration.

    ``capabilities``, ``tracker``, ``saver`` and ``encoder`` are passed to :class:`Checkpointer`
    (names or
    ``module:attribute``, see :mod:`pyvmm.migration.algorithms`); ``ram_size`` is the
    machine's RAM (at least :data:`REGION_FIRST_PAGE` + :data:`REGION_PAGES` pages); ``base``
    lets a user's subclass (with its own :meth:`~CheckpointMachine.make_checkpointer`) be
    configured the same way; ``exact_increments``: see
    :attr:`CheckpointMachine.exact_increments` (off for a tracker that may report a page
    written that was not: correct, only wasteful).
    """
    if ram_size < (REGION_FIRST_PAGE + REGION_PAGES) * PAGE_SIZE:
        raise ValueError(f"ram_size {ram_size} is too small for the working region")
    label = "_".join(capabilities) or "full"
    # a class name, whatever the names hold (module:attribute, dashes)
    name = re.sub(r"\W", "_", f"CheckpointMachine_{label}_{tracker}" +
                  (f"_{saver}" if saver else "") + (f"_{encoder}" if encoder else ""))
    attributes: dict[str, Any] = {"capabilities": tuple(capabilities), "tracker": tracker,
                                  "ram_size": ram_size, "durable": durable, "saver": saver,
                                  "exact_increments": exact_increments, "encoder": encoder}
    return type(name, (base,), attributes)
