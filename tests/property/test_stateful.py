"""The checkpoint state machine (pyvmm.testing.stateful) run against every Checkpointer mode:
random host and guest writes, checkpoints and prefix reloads, checked against a plain RAM model."""

from __future__ import annotations

import pytest
from hypothesis import Phase, given, settings
from hypothesis.stateful import run_state_machine_as_test
from keystone import KS_ARCH_ARM64, KS_MODE_LITTLE_ENDIAN, Ks

from pyvmm.machine import Machine
from pyvmm.migration.checkpoint import Checkpointer, CheckpointStats
from pyvmm.testing.stateful import (
    SNIPPET_INSNS,
    CheckpointAlgorithm,
    CheckpointMachine,
    checkpoint_state_machine,
    encode_store,
    profile_settings,
)
from pyvmm.testing.strategies import GuestStore, guest_stores

CI = profile_settings()

FullOnly = checkpoint_state_machine(())
TestFullCheckpoints = FullOnly.TestCase
TestFullCheckpoints.settings = CI

IncrementalAsync = checkpoint_state_machine(("incremental",), tracker="async")
TestIncrementalAsync = IncrementalAsync.TestCase
TestIncrementalAsync.settings = CI

IncrementalWp = checkpoint_state_machine(("incremental",), tracker="wp")
TestIncrementalWp = IncrementalWp.TestCase
TestIncrementalWp.settings = CI

IncrementalLive = checkpoint_state_machine(("incremental", "live"))
TestIncrementalLive = IncrementalLive.TestCase
TestIncrementalLive.settings = CI

FullLive = checkpoint_state_machine(("live",))
TestFullLive = FullLive.TestCase
TestFullLive.settings = CI

IncrementalCow = checkpoint_state_machine(("incremental", "cow"), tracker="wp")
TestIncrementalCow = IncrementalCow.TestCase
TestIncrementalCow.settings = CI


@CI
@given(store=guest_stores())
def test_store_snippet_matches_keystone(store: GuestStore) -> None:
    """The hand-encoded snippet is what an assembler makes of the same instructions."""
    address = 0x4001_0000 + store.offset
    reg = {1: "w1", 2: "w1", 4: "w1", 8: "x1"}[store.size]
    op = {1: "strb", 2: "strh", 4: "str", 8: "str"}[store.size]
    value = store.value
    source = "; ".join([
        f"movz x0, #{address & 0xFFFF}", f"movk x0, #{address >> 16}, lsl #16",
        f"movz x1, #{value & 0xFFFF}",
        *(f"movk x1, #{(value >> (16 * hw)) & 0xFFFF}, lsl #{16 * hw}" for hw in (1, 2, 3)),
        f"{op} {reg}, [x0]",
    ])
    encoding, count = Ks(KS_ARCH_ARM64, KS_MODE_LITTLE_ENDIAN).asm(source)
    assert count == SNIPPET_INSNS
    assert bytes(encoding) == encode_store(address, value, store.size)


class SavesWrongByte:
    """A checkpoint algorithm with a consistency bug: it saves one byte that the guest never had
    (it flips the byte, checkpoints, flips it back) — the guest sees nothing wrong."""

    def __init__(self, inner: Checkpointer, machine: Machine, gpa: int) -> None:
        self.inner, self.machine, self.gpa = inner, machine, gpa

    def _flip(self) -> None:
        view = self.machine.memory_view(self.gpa, 1)
        view[0] ^= 0xFF

    def checkpoint(self) -> CheckpointStats:
        self._flip()
        try:
            return self.inner.checkpoint()
        finally:
            self._flip()

    def close(self) -> None:
        self.inner.close()


class PluggedInBrokenAlgorithm(CheckpointMachine):
    """How a user tests their own algorithm: override make_checkpointer."""

    def make_checkpointer(self) -> CheckpointAlgorithm:
        inner = Checkpointer(self.machine, self.path, durable=False)
        return SavesWrongByte(inner, self.machine, self.region_gpa(3) + 100)


def test_state_machine_finds_a_broken_algorithm() -> None:
    """The machine has teeth: a checkpoint that differs from the guest by one byte is reported."""
    machine = checkpoint_state_machine((), base=PluggedInBrokenAlgorithm)
    fast = settings(CI, phases=[Phase.generate], max_examples=50)
    with pytest.raises(AssertionError, match="reloaded page 3 differs"):
        run_state_machine_as_test(machine, settings=fast)  # type: ignore[no-untyped-call]
