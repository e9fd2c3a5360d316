"""Looking into checkpoint files without loading a guest: ``checkpoint info`` and ``export``."""

from __future__ import annotations

import datetime
import errno
import os
import uuid
from typing import Any

from ..errors import ConfigError, PyvmmError
from ..output_file import output_fd
from ..units import format_size
from .container import CheckpointFile


def file_info(path: str) -> dict[str, Any]:
    """Everything ``checkpoint info`` shows, as JSON types."""
    with CheckpointFile.open(path) as container:
        header = container.header
        increments = []
        for inc in header.increments:
            stats = container.stats(inc.index)
            checksums = container.checksums(inc.index)
            increments.append({
                "index": inc.index,
                "kind": inc.kind,
                "parent": inc.parent,
                "created": datetime.datetime.fromtimestamp(
                    inc.created_ns / 1e9, tz=datetime.timezone.utc).isoformat(),
                "stream_offset": inc.stream_offset,
                "stream_bytes": inc.stream_length,
                "pages": inc.pages,
                "zero_pages": inc.zero_pages,
                "stats": stats,
                # CRC-32C of the RAM's per-page CRC table at the pause (checksum capability)
                "ram_digest": None if checksums is None else f"{checksums.ram_digest:08x}",
            })
        return {
            "file": path,
            "file_bytes": os.fstat(container.fd).st_size,
            "format_version": header.format_version,
            "machine": header.machine,
            "vm_id": str(uuid.UUID(bytes=header.vm_id)),
            "page_size": header.page_size,
            "ram_blocks": [{"name": b.name, "gpa": b.gpa, "size": b.size}
                           for b in header.ram_blocks],
            "capabilities": list(header.capabilities),
            "increments": increments,
        }


def format_info(info: dict[str, Any]) -> str:
    """The human-readable form of :func:`file_info`."""
    lines = [
        f"{info['file']}: pyvmm checkpoint, format {info['format_version']}, "
        f"{format_size(info['file_bytes'])}",
        f"  machine       {info['machine']}  (vm {info['vm_id']})",
        f"  page size     {info['page_size']}",
        "  RAM blocks    " + ", ".join(f"{b['name']} {format_size(b['size'])} at 0x{b['gpa']:x}"
                                       for b in info["ram_blocks"]),
        f"  capabilities  {', '.join(info['capabilities']) or '(none)'}",
        *([f"  VM id         {names[-1]}"] if (names := [
            str(inc["stats"]["vm_name"]) for inc in info["increments"]
            if inc["stats"].get("vm_name")]) else []),
        f"  increments    {len(info['increments'])}",
    ]
    for inc in info["increments"]:
        stats = inc["stats"]
        parent = "" if inc["parent"] < 0 else f" (parent {inc['parent']})"
        lines.append(f"  #{inc['index']} {inc['kind']}{parent}  {inc['created']}  "
                     f"stream {format_size(inc['stream_bytes'])}, {inc['pages']} pages, "
                     f"{inc['zero_pages']} zero pages")
        if inc.get("ram_digest"):
            lines.append(f"      RAM digest {inc['ram_digest']} (CRC-32C, checksums on pages and "
                         f"stream)")
        if stats:
            timing = ", ".join(f"{key.removesuffix('_ms')} {stats[key]:.1f} ms"
                               for key in ("total_ms", "setup_ms", "downtime_ms")
                               if isinstance(stats.get(key), (int, float)))
            if timing:
                lines.append(f"      {timing}")
            extra = ", ".join(f"{key.replace('_', ' ')} {stats[key]}"
                              for key in ("tracker", "write_faults", "shadow_copies",
                                          "pages_carried") if stats.get(key))
            if extra:
                lines.append(f"      {extra}")
            packed = stats.get("compressed_pages")
            if isinstance(packed, int) and packed:
                frames = stats.get("compressed_bytes", 0)
                lines.append(f"      encoder {stats.get('encoder')} level "
                             f"{stats.get('compress_level')}: {packed} pages compressed into "
                             f"{format_size(int(frames))} "
                             f"({packed * info['page_size'] / max(int(frames), 1):.1f}x)")
            devices = stats.get("devices")
            if isinstance(devices, list) and devices:
                lines.append(f"      devices: {', '.join(str(d) for d in devices)}")
    return "\n".join(lines)


def export_increment(path: str, increment: int | None, output: str) -> int:
    """Copy increment ``increment``'s raw QEMU stream (default: the last) to ``output`` (``-``:
    standard output, e.g. a pipe; a FIFO or character device is written in place, a regular
    file replaced only once complete: see :mod:`pyvmm.output_file`). The checkpoint file
    itself is never an output."""
    with CheckpointFile.open(path) as container:
        increments = container.header.increments
        if not increments:
            raise ConfigError(f"{path} holds no increments")
        index = len(increments) - 1 if increment is None else increment
        if not 0 <= index < len(increments):
            raise ConfigError(f"{path} has increments 0..{len(increments) - 1}, not {index}")
        inc = increments[index]
        if os.path.exists(output) and os.path.samefile(output, path):
            raise ConfigError(f"{output} is the checkpoint file itself: export to another file")
        if any(run.compressed for run in container.page_index(index)):
            raise ConfigError(f"increment {index} of {path} holds compressed page records "
                              f"(pyvmm's, flag 0x400), which QEMU cannot read: squash it into "
                              f"a plain file first (pyvmm checkpoint squash {path} -n "
                              f"{index + 1} -o FILE), then export that")
        try:
            with output_fd(output) as out:
                _copy_out(container.fd, out, inc.stream_offset, inc.stream_length, path, index)
        except OSError as err:
            raise ConfigError(f"cannot write {output}: {err.strerror}") from err
        return inc.stream_length


def _copy_out(fd: int, out: int, offset: int, left: int, path: str, index: int) -> None:
    """``left`` bytes of ``fd`` from ``offset`` to ``out``: in the kernel between files, through
    a buffer to anything else (a pipe, a terminal)."""
    try:
        while left:
            sent = os.copy_file_range(fd, out, left, offset)
            if sent == 0:
                raise PyvmmError(f"{path} ended inside increment {index}'s stream")
            offset += sent
            left -= sent
        return
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.EXDEV, errno.EBADF, errno.ENOSYS):
            raise
    while left:
        chunk = os.pread(fd, min(left, 1 << 20), offset)
        if not chunk:
            raise PyvmmError(f"{path} ended inside increment {index}'s stream")
        view = memoryview(chunk)
        while view:
            view = view[os.write(out, view):]
        offset += len(chunk)
        left -= len(chunk)
