"""Guest instructions per second: pyvmm's machine against plain unicorn running the same code.

Baseline, measured in the same run: a bare ``Uc`` with the same RAM size mapped at the same address,
the same UART reduced to a Python callback that collects bytes, and the same PSCI power-off hook —
nothing else.  pyvmm adds its vCPU thread, run states, devices and MRS/MSR interception.
Target (issue 2): pyvmm >= 0.9x of plain unicorn.

The last column is plain unicorn with only pyvmm's stop gate added (a C block hook that serves
pauses from other threads at block starts, pyvmm.vcpu_gate): what that correctness costs alone.

    python benchmarks/bench_cpu.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from unicorn import (
    UC_ARCH_ARM64,
    UC_HOOK_BLOCK,
    UC_HOOK_INTR,
    UC_MODE_ARM,
    UC_PROT_ALL,
    Uc,
)
from unicorn import arm64_const as a64

from pyvmm.boot import GuestSpec, boot
from pyvmm.guests.workload import WorkloadOptions, build_workload
from pyvmm.machine import RAM_BASE
from pyvmm.vcpu_gate import StopGate

RAM = 256 << 20
CASES = {
    "bare loop": "pattern=loop,working_set=64M,passes=12,touch=64",
    "memory-heavy (sequential, 4 KiB per touch)": "pattern=sequential,working_set=64M,passes=12,"
                                                   "touch=4096",
    "memory-heavy (random, 512 B per touch)": "pattern=random,working_set=64M,passes=12,touch=512",
}


def plain_unicorn(options: WorkloadOptions, count_insns: bool = False,
                  gate: bool = False) -> tuple[float, int]:
    """Run the workload on a bare unicorn (with pyvmm's stop gate if ``gate``); returns
    (seconds, instructions if counted else 0)."""
    image = build_workload(options, RAM_BASE, RAM)
    uc: Any = Uc(UC_ARCH_ARM64, UC_MODE_ARM)
    stop_gate = StopGate(uc) if gate else None
    uc.mem_map(RAM_BASE, RAM, UC_PROT_ALL)
    uc.mem_write(image.load_gpa, image.code)
    out = bytearray()

    def uart_write(_uc: Any, offset: int, _size: int, value: int, _ud: Any) -> None:
        if offset == 0:
            out.append(value & 0xFF)

    uc.mmio_map(0x0900_0000, 0x1000, lambda *_: 0, None, uart_write, None)

    def on_intr(uc: Any, intno: int, _ud: Any) -> None:  # PSCI SYSTEM_OFF via hvc #0
        uc.emu_stop()

    uc.hook_add(UC_HOOK_INTR, on_intr)
    insns = [0]
    if count_insns:
        def on_block(_uc: Any, _address: int, size: int, _ud: Any) -> None:
            insns[0] += size // 4

        uc.hook_add(UC_HOOK_BLOCK, on_block)
    for name, value in image.registers.items():
        uc.reg_write(getattr(a64, f"UC_ARM64_REG_{name.upper()}"), value)
    started = time.perf_counter()
    uc.emu_start(image.entry, 0xFFFF_FFFF_FFFF_FFFC)
    elapsed = time.perf_counter() - started
    assert out.rstrip().splitlines()[-1].startswith(b"pyvmm-workload: done"), out[-200:]
    if stop_gate is not None:
        assert stop_gate.stops == 0
        stop_gate.close()
    return elapsed, insns[0]


def pyvmm_machine(options: WorkloadOptions) -> float:
    """Run the same workload through pyvmm's boot path and vCPU thread."""
    machine = boot(GuestSpec(workload=options), ram_size=RAM, seed=options.seed)
    with machine:
        started = time.perf_counter()
        result = machine.run()
        elapsed = time.perf_counter() - started
        assert result.exit_code == 0, result
    return elapsed


def instructions(options: WorkloadOptions) -> int:
    """Instruction count of a whole run, from block-counted runs of 1 and 2 passes (linear)."""
    one = plain_unicorn(WorkloadOptions.parse("passes=1", options), count_insns=True)[1]
    two = plain_unicorn(WorkloadOptions.parse("passes=2", options), count_insns=True)[1]
    return one + (two - one) * (options.passes - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3, help="runs per side (median is used)")
    args = parser.parse_args()
    print(f"{'workload':46} {'plain Minsn/s':>14} {'pyvmm Minsn/s':>14} {'ratio':>7} "
          f"{'gate alone':>10}")
    for label, text in CASES.items():
        options = WorkloadOptions.parse(text)
        count = instructions(options)
        plain, gated, mine = [], [], []
        for _ in range(args.repeat):  # interleaved, so drift on a shared machine hits all sides
            plain.append(plain_unicorn(options)[0])
            gated.append(plain_unicorn(options, gate=True)[0])
            mine.append(pyvmm_machine(options))
        p, g, m = statistics.median(plain), statistics.median(gated), statistics.median(mine)
        print(f"{label:46} {count / p / 1e6:14.1f} {count / m / 1e6:14.1f} {p / m:6.2f}x "
              f"{p / g:9.2f}x")


if __name__ == "__main__":
    main()
