"""Determinism (DESIGN.md §6): same guest + same seed -> same bytes; a run of N instructions equals
runs of N1 + N2 instructions, in CPU state, RAM and output."""

from __future__ import annotations


from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm.boot import GuestSpec, boot
from pyvmm.guests.workload import WorkloadOptions
from pyvmm.machine import Machine, StopReason
from pyvmm.testing.digest import ram_digest

RAM = 32 << 20


def workload(text: str, seed: int) -> Machine:
    return boot(GuestSpec(workload=WorkloadOptions.parse(text)), ram_size=RAM, seed=seed)


def test_same_seed_same_ram_and_output_different_seed_differs() -> None:
    text = "pattern=hotcold,working_set=4M,passes=3,touch=128"
    runs = []
    for seed in (11, 11, 12):
        with workload(text, seed) as machine:
            result = machine.run()
            assert result.reason is StopReason.SHUTDOWN
            runs.append((ram_digest(machine), bytes(machine.uart_output)))
    assert runs[0] == runs[1]
    assert runs[0][0] != runs[2][0]


@settings(max_examples=8, deadline=None)
@given(total=st.integers(1, 400_000), data=st.data())
def test_n_equals_n1_plus_n2(total: int, data: st.DataObject) -> None:
    text = "pattern=random,working_set=1M,passes=0,touch=64"
    first = data.draw(st.integers(0, total), label="N1")
    with workload(text, 3) as whole:
        assert whole.run(max_insns=total).insns == total
        expected = (whole.cpu_state(), ram_digest(whole), bytes(whole.uart_output))
    with workload(text, 3) as split:
        split.run(max_insns=first)
        assert split.run(max_insns=total - first).insns == total
        assert (split.cpu_state(), ram_digest(split), bytes(split.uart_output)) == expected
