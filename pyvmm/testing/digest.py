"""Digests of a machine's state, for tests that compare two machines (a reload with the machine at
the pause, a run with its replay) without keeping whole RAM images around."""

from __future__ import annotations

import hashlib

from ..machine import Machine
from ..ram import PAGE_SIZE


def ram_digest(machine: Machine) -> str:
    """SHA-256 over every RAM block's name and its non-zero pages (page number, then bytes).

    Zero pages do not enter it, so two machines whose RAM reads the same have the same digest
    whichever pages they happen to have touched. Named blocks: a page moved to another block
    changes it.
    """
    digest = hashlib.sha256()
    for block in machine.ram_blocks:
        digest.update(len(block.name).to_bytes(1, "little") + block.name.encode())
        for first, count in block.nonzero_pages().runs():
            digest.update(first.to_bytes(8, "little"))
            digest.update(block.mem[first * PAGE_SIZE:(first + count) * PAGE_SIZE])
    return digest.hexdigest()
