"""What ``changed`` does that ``async`` does not, with the kit's fixtures (pyvmm's correctness
oracles come with ``--pyvmm-algorithm changed``: see the README)."""

from pathlib import Path

from pyvmm.machine import Machine
from pyvmm.migration.checkpoint import Checkpointer, reload
from pyvmm.testing.digest import ram_digest


def test_a_page_rewritten_with_its_own_bytes_is_not_saved_again(
        pyvmm_machine: Machine, pyvmm_checkpoint_file: Path) -> None:
    checkpointer = Checkpointer(pyvmm_machine, pyvmm_checkpoint_file, durable=False,
                                capabilities=["incremental"], tracker="changed")
    pyvmm_machine.run(max_insns=200_000)
    checkpointer.checkpoint()
    page = pyvmm_machine.ram.page(256)  # the workload's working set starts at 1 MiB
    page[:] = bytes(page)  # written, not changed
    pyvmm_machine.write_memory(0x4080_0000, b"changed")
    stats = checkpointer.checkpoint()
    checkpointer.close()
    assert stats.pages + stats.zero_pages == 1
    with reload(f"chpt:{pyvmm_checkpoint_file}") as reloaded:
        assert ram_digest(reloaded) == ram_digest(pyvmm_machine)
