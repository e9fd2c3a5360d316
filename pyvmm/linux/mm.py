"""The guest's address-space bookkeeping: brk, mmap, munmap, mremap, mprotect, madvise.

All guest RAM is always mapped in the vCPU (pyvmm has no MMU to unmap pages from), so these calls
only keep :class:`~pyvmm.linux.state.MemoryState` (what Linux would list in /proc/PID/maps) and
make sure newly mapped memory reads as zero or as the file's bytes.  Protections are recorded, not
enforced.  Mapping addresses are chosen top-down in the mmap window, like Linux's default layout,
and purely from the state, so the same program gets the same addresses every run.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable

from ..ram import PAGE_SIZE
from .abi import (
    MADV_DONTNEED,
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_FIXED_NOREPLACE,
    MAP_PRIVATE,
    MAP_SHARED,
    MAP_SHARED_VALIDATE,
    MAP_TYPE,
    MREMAP_DONTUNMAP,
    MREMAP_FIXED,
    MREMAP_MAYMOVE,
    PROT_WRITE,
    Errno,
    LinuxErrno,
)
from .guestmem import GuestMemory, page_down, page_up
from .state import Mapping, MemoryState

#: Reads ``length`` bytes of the file at ``path`` from ``offset`` (short at end of file).
FileReader = Callable[[str, int, int], bytes]

_MASK64 = (1 << 64) - 1


def _fail(errno: Errno) -> LinuxErrno:
    return LinuxErrno(errno)


def find_mapping(state: MemoryState, addr: int) -> Mapping | None:
    """The mapping holding ``addr``, if any."""
    starts = [m.start for m in state.mappings]
    i = bisect.bisect_right(starts, addr) - 1
    if i >= 0 and state.mappings[i].start <= addr < state.mappings[i].end:
        return state.mappings[i]
    return None


def insert_mapping(state: MemoryState, new: Mapping) -> None:
    """Add ``new``, replacing whatever was mapped in its range (MAP_FIXED semantics)."""
    remove_range(state, new.start, new.end)
    bisect.insort(state.mappings, new, key=lambda m: m.start)


def remove_range(state: MemoryState, start: int, end: int) -> None:
    """Unmap ``[start, end)``: drop, trim or split the mappings it touches."""
    kept: list[Mapping] = []
    for m in state.mappings:
        if m.end <= start or m.start >= end:
            kept.append(m)
            continue
        if m.start < start:
            kept.append(Mapping(m.start, start - m.start, m.prot, m.flags, m.kind, m.path,
                                m.offset))
        if m.end > end:
            kept.append(Mapping(end, m.end - end, m.prot, m.flags, m.kind, m.path,
                                m.offset + (end - m.start)))
    state.mappings = kept


def _is_free(state: MemoryState, start: int, end: int) -> bool:
    return all(m.end <= start or m.start >= end for m in state.mappings)


def _in_window(state: MemoryState, start: int, end: int) -> bool:
    return state.mmap_low <= start and end <= state.mmap_high


def _find_free(state: MemoryState, length: int) -> int:
    """The highest page-aligned address in the mmap window with ``length`` free bytes above it."""
    top = state.mmap_high
    for m in sorted(state.mappings, key=lambda m: m.start, reverse=True):
        if m.start >= top:
            continue
        if top - max(m.end, state.mmap_low) >= length:
            return top - length
        top = m.start
        if top <= state.mmap_low:
            break
    if top - state.mmap_low >= length:
        return top - length
    raise _fail(Errno.ENOMEM)


def brk(state: MemoryState, mem: GuestMemory, addr: int) -> int:
    """brk(2): move the program break within ``[brk_start, brk_limit]``; return the new break
    (the old one when the request is refused, as Linux does)."""
    if addr < state.brk_start or addr > state.brk_limit:
        return state.brk
    old_top, new_top = page_up(state.brk), page_up(addr)
    if new_top > old_top:
        # Pages given back earlier may still hold old bytes; Linux hands out fresh zero pages.
        mem.zero(old_top, new_top - old_top)
    state.brk = addr
    remove_range(state, state.brk_start, max(old_top, new_top))
    if new_top > state.brk_start:
        insert_mapping(state, Mapping(state.brk_start, new_top - state.brk_start, 3, MAP_PRIVATE,
                                      "heap"))
    return addr


def mmap(state: MemoryState, mem: GuestMemory, read_file: FileReader, addr: int, length: int,
         prot: int, flags: int, file_path: str | None, offset: int) -> int:
    """mmap(2).  ``file_path``: the guest path of the fd's file, None for MAP_ANONYMOUS."""
    kind = flags & MAP_TYPE
    if kind not in (MAP_PRIVATE, MAP_SHARED, MAP_SHARED_VALIDATE):
        raise _fail(Errno.EINVAL)
    if length == 0 or offset % PAGE_SIZE or addr % PAGE_SIZE and flags & MAP_FIXED:
        raise _fail(Errno.EINVAL)
    size = page_up(length)
    if size == 0 or size > _MASK64 - addr:
        raise _fail(Errno.ENOMEM)
    anonymous = bool(flags & MAP_ANONYMOUS)
    if not anonymous and kind != MAP_PRIVATE and prot & PROT_WRITE:
        # A writable shared file mapping would have to write back to the file: not modelled.
        raise _fail(Errno.ENODEV)
    if flags & (MAP_FIXED | MAP_FIXED_NOREPLACE):
        start = page_down(addr)
        if not mem.valid(start, size):
            raise _fail(Errno.ENOMEM)
        if flags & MAP_FIXED_NOREPLACE and not flags & MAP_FIXED and \
                not _is_free(state, start, start + size):
            raise _fail(Errno.EEXIST)
    elif addr and _in_window(state, page_down(addr), page_down(addr) + size) and \
            _is_free(state, page_down(addr), page_down(addr) + size):
        start = page_down(addr)  # an honoured hint
    else:
        start = _find_free(state, size)
    data = b"" if anonymous or file_path is None else read_file(file_path, offset, length)
    mem.zero(start, size)
    if data:
        mem.write(start, data)
    insert_mapping(state, Mapping(start, size, prot, flags, "anon" if anonymous else "file",
                                  "" if anonymous else (file_path or ""),
                                  0 if anonymous else offset))
    return start


def munmap(state: MemoryState, addr: int, length: int) -> int:
    if addr % PAGE_SIZE or length == 0 or addr + page_up(length) > _MASK64:
        raise _fail(Errno.EINVAL)
    remove_range(state, addr, addr + page_up(length))
    return 0


def mremap(state: MemoryState, mem: GuestMemory, old: int, old_size: int, new_size: int,
           flags: int, new_addr: int) -> int:
    """mremap(2): shrink in place, grow in place when the pages after are free, else move."""
    if old % PAGE_SIZE or flags & ~(MREMAP_MAYMOVE | MREMAP_FIXED | MREMAP_DONTUNMAP) or \
            flags & MREMAP_FIXED and not flags & MREMAP_MAYMOVE or new_size == 0:
        raise _fail(Errno.EINVAL)
    old_size, new_size = page_up(old_size), page_up(new_size)
    mapping = find_mapping(state, old)
    if mapping is None or old + old_size > mapping.end or old_size == 0:
        raise _fail(Errno.EFAULT)
    template = Mapping(old, new_size, mapping.prot, mapping.flags, mapping.kind, mapping.path,
                       mapping.offset + (old - mapping.start))
    if flags & (MREMAP_FIXED | MREMAP_DONTUNMAP):
        if flags & MREMAP_FIXED:
            target = new_addr
            if target % PAGE_SIZE or not mem.valid(target, new_size):
                raise _fail(Errno.EINVAL)
        else:
            target = _find_free(state, new_size)
        return _move(state, mem, template, old_size, target, bool(flags & MREMAP_DONTUNMAP))
    if new_size <= old_size:
        remove_range(state, old + new_size, old + old_size)
        return old
    end = old + new_size
    if _is_free(state, old + old_size, end) and mem.valid(old, new_size) and \
            (not _in_window(state, old, old + old_size) or _in_window(state, old, end)):
        mem.zero(old + old_size, new_size - old_size)
        insert_mapping(state, template)
        return old
    if not flags & MREMAP_MAYMOVE:
        raise _fail(Errno.ENOMEM)
    return _move(state, mem, template, old_size, _find_free(state, new_size), False)


def _move(state: MemoryState, mem: GuestMemory, template: Mapping, old_size: int, target: int,
          keep_old: bool) -> int:
    old, new_size = template.start, template.length
    moved = min(old_size, new_size)
    data = mem.read(old, moved)
    mem.zero(target, new_size)
    mem.write(target, data)
    if keep_old:
        mem.zero(old, old_size)  # MREMAP_DONTUNMAP leaves the old range mapped but empty
    else:
        remove_range(state, old, old + old_size)
    template.start = target
    insert_mapping(state, template)
    return target


def mprotect(state: MemoryState, addr: int, length: int, prot: int) -> int:
    """Record new protections (ENOMEM if part of the range is unmapped, as Linux says)."""
    if addr % PAGE_SIZE:
        raise _fail(Errno.EINVAL)
    end = addr + page_up(length)
    if end == addr:
        return 0
    covered = sum(min(m.end, end) - max(m.start, addr) for m in state.mappings
                  if m.start < end and m.end > addr)
    if covered != end - addr:
        raise _fail(Errno.ENOMEM)
    pieces = [m for m in state.mappings if m.start < end and m.end > addr]
    remove_range(state, addr, end)
    for m in pieces:
        start = max(m.start, addr)
        insert_mapping(state, Mapping(start, min(m.end, end) - start, prot, m.flags, m.kind,
                                      m.path, m.offset + (start - m.start)))
    return 0


def madvise(state: MemoryState, mem: GuestMemory, read_file: FileReader, addr: int, length: int,
            advice: int) -> int:
    """madvise(2): hints are accepted; MADV_DONTNEED drops private pages (they refill with zeros,
    or with the file's bytes for a private file mapping), as on Linux."""
    if addr % PAGE_SIZE:
        raise _fail(Errno.EINVAL)
    end = addr + page_up(length)
    if advice != MADV_DONTNEED:
        return 0
    for m in [m for m in state.mappings if m.start < end and m.end > addr]:
        if m.kind == "image":
            continue  # never done to a program's own segments; refilling them is not modelled
        start, stop = max(m.start, addr), min(m.end, end)
        mem.zero(start, stop - start)
        if m.kind == "file":
            data = read_file(m.path, m.offset + (start - m.start), stop - start)
            mem.write(start, data)
    return 0
