"""The Linux layer's whole state as plain data, and its JSON-ready dict form for checkpoints.

Everything a running Linux program has outside guest RAM and registers lives here: memory layout
and mappings, brk, open files with offsets and flags, the file overlay, cwd, umask, signal
dispositions, the random stream position, output counters and exit status.  Nothing here refers to
host objects (no open files, no callables), so a checkpoint can carry it and a new process can
continue from it.  :func:`state_to_dict`/:func:`state_from_dict` convert to and from a dict of JSON
types (``bytes`` as base64 text, integer dict keys as decimal text).

A saved state is untrusted input: :func:`state_from_dict` checks every overlay file's declared
size and chunks before it decodes them, and that the overlay holds no more than its limit.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import types
import typing
from typing import Any

from ..errors import ConfigError
from .filedata import CHUNK_SIZE, FileData, check_file_data

#: Version of the dict layout; bump when a field changes meaning.  2: overlay data is a
#: :class:`FileData` (sparse chunks) and FileState has ``files_limit``; version 1 still loads.
STATE_VERSION = 2
#: Most bytes ``FileState.files_limit`` may be: the whole Linux state is saved as JSON in a
#: section of at most 1 GiB (``machine_state.MAX_LINUX_STATE``), and base64 takes 4/3 of the
#: data, so 512 MiB of overlay (683 MiB of text) leaves room for the rest of the state.
MAX_FILES_LIMIT = 512 << 20
_OVERLAY_KINDS = ("file", "dir", "symlink", "whiteout")
#: Longest base64 text of one chunk.
_MAX_CHUNK_TEXT = 4 * -(-CHUNK_SIZE // 3)


@dataclasses.dataclass
class Mapping:
    """One guest memory mapping ``[start, start+length)``, page-aligned, as /proc/PID/maps lists."""

    start: int
    length: int
    prot: int
    flags: int
    #: "image", "heap", "stack", "anon" or "file".
    kind: str
    #: Guest path of a file mapping (or of the program for "image").
    path: str = ""
    #: File offset of ``start`` for a file mapping.
    offset: int = 0

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclasses.dataclass
class MemoryState:
    """Where the program's memory is and what is mapped in it."""

    #: The RAM block that holds the ELF image and the brk heap.
    image_block: str
    image_gpa: int
    image_size: int
    brk_start: int
    brk: int
    brk_limit: int
    #: mmap() allocates top-down in ``[mmap_low, mmap_high)`` (main RAM, below the stack).
    mmap_low: int
    mmap_high: int
    stack_top: int
    stack_size: int
    mappings: list[Mapping] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class OverlayNode:
    """A guest-side file or directory that differs from the host: written, created or deleted."""

    #: "file", "dir", "symlink" (``data`` holds the target) or "whiteout" (deleted: hides the
    #: host path).
    kind: str
    data: FileData = dataclasses.field(default_factory=FileData)
    mode: int = 0o644
    mtime_ns: int = 0


@dataclasses.dataclass
class OpenFileDescription:
    """What an fd refers to (shared by dup'ed fds): Linux's ``struct file``."""

    #: "stdin", "stdout", "stderr", "file", "dir", "null", "zero" or "random".
    kind: str
    path: str
    #: open(2) access mode and status flags (O_APPEND, O_NONBLOCK...).
    flags: int
    #: Byte offset; for a directory, the index of the next entry getdents64 returns.
    offset: int = 0


@dataclasses.dataclass
class FdEntry:
    description: int  # key in FileState.descriptions
    cloexec: bool = False


@dataclasses.dataclass
class FileState:
    """The guest's view of files: host paths it may read, its overlay, its fds."""

    cwd: str
    #: Absolute host paths (files or directories) the guest sees read-only at the same path.
    exports: list[str]
    stdin: bytes = b""
    #: stdin is the pyvmm process's own standard input (a pipe, a terminal), read as the guest
    #: reads it, instead of the ``stdin`` bytes; a reloaded guest reads its new process's.
    stdin_live: bool = False
    umask: int = 0o022
    overlay: dict[str, OverlayNode] = dataclasses.field(default_factory=dict)
    descriptions: dict[int, OpenFileDescription] = dataclasses.field(default_factory=dict)
    fds: dict[int, FdEntry] = dataclasses.field(default_factory=dict)
    next_description: int = 0
    max_fds: int = 1024
    #: Most bytes the overlay may hold (file pages, plus a charge per entry; see
    #: :mod:`pyvmm.linux.vfs`): past it the guest gets ENOSPC.  ``load_program`` sets it from
    #: the RAM size (half of it, as tmpfs); the default here is the most it may be.
    files_limit: int = MAX_FILES_LIMIT


@dataclasses.dataclass
class SigAction:
    handler: int = 0
    flags: int = 0
    restorer: int = 0
    mask: int = 0


@dataclasses.dataclass
class SignalState:
    """Signal dispositions and mask as the guest set them (signals are never delivered)."""

    actions: dict[int, SigAction] = dataclasses.field(default_factory=dict)
    mask: int = 0
    altstack_sp: int = 0
    altstack_flags: int = 2  # SS_DISABLE
    altstack_size: int = 0


@dataclasses.dataclass
class LinuxState:
    """All state of one Linux process run by :class:`~pyvmm.linux.process.LinuxProcess`."""

    exe_path: str
    argv: list[str]
    envp: list[str]
    memory: MemoryState
    files: FileState
    signals: SignalState = dataclasses.field(default_factory=SignalState)
    #: The thread name (``/proc/self/comm``, prctl PR_SET_NAME), at most 15 bytes.
    comm: str = ""
    #: Bytes of the getrandom() stream handed out so far (the stream is a function of the seed).
    random_offset: int = 0
    #: set_tid_address() and set_robust_list() arguments (recorded; one thread, never used).
    clear_child_tid: int = 0
    robust_list_head: int = 0
    #: setrlimit()/prlimit64() values the guest set: resource -> [soft, hard].
    rlimits: dict[int, list[int]] = dataclasses.field(default_factory=dict)
    stdout_bytes: int = 0
    stderr_bytes: int = 0
    syscalls: int = 0
    #: Set once the program has ended: its exit status, or the signal that killed it.
    exit_code: int | None = None
    killed_by: str | None = None


def state_to_dict(state: LinuxState) -> dict[str, Any]:
    """``state`` as a dict of JSON types (``json.dumps`` takes it as is)."""
    out = _encode(state)
    assert isinstance(out, dict)
    out["version"] = STATE_VERSION
    return out


def state_from_dict(data: dict[str, Any]) -> LinuxState:
    """The inverse of :func:`state_to_dict`; ConfigError naming the field on malformed input."""
    if not isinstance(data, dict):
        raise ConfigError("invalid Linux process state: not a dict")
    version = data.get("version")
    if version not in (1, STATE_VERSION):
        raise ConfigError(f"invalid Linux process state: version {version!r}, expected "
                          f"{STATE_VERSION}")
    body = {k: v for k, v in data.items() if k != "version"}
    if version == 1:
        body = _upgrade_v1(body)
    state: LinuxState = _decode(LinuxState, body, "state")
    _check_files(state.files)
    return state


def _upgrade_v1(body: dict[str, Any]) -> dict[str, Any]:
    """A version-1 body in version 2's layout: overlay data was one base64 text per entry."""
    files = body.get("files")
    overlay = files.get("overlay") if isinstance(files, dict) else None
    if not isinstance(overlay, dict):
        return body  # _decode names what is wrong
    for path, node in overlay.items():
        if isinstance(node, dict) and isinstance(node.get("data"), str):
            raw = _decode(bytes, node["data"], f"state.files.overlay[{path!r}].data")
            node["data"] = _encode(FileData.of(raw))
    return body


def _check_files(files: FileState) -> None:
    """Bounds of the overlay a loaded state declares (its data is decoded already, chunk by
    bounded chunk; what it claims must agree with what it holds)."""
    if not 0 <= files.files_limit <= MAX_FILES_LIMIT:
        raise ConfigError(f"invalid Linux process state: files_limit {files.files_limit} is "
                          f"outside [0, {MAX_FILES_LIMIT}]")
    stored = 0
    for path, node in files.overlay.items():
        if node.kind not in _OVERLAY_KINDS:
            raise ConfigError(f"invalid Linux process state: overlay entry {path!r} has kind "
                              f"{node.kind!r}")
        if node.kind in ("dir", "whiteout") and node.data.size:
            raise ConfigError(f"invalid Linux process state: overlay {node.kind} {path!r} "
                              f"holds data")
        stored += node.data.allocated
    if stored > files.files_limit:
        raise ConfigError(f"invalid Linux process state: the overlay holds {stored} bytes, "
                          f"more than its limit of {files.files_limit}")


def _encode(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    return value


def _decode(kind: Any, value: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``kind`` and build it (dataclasses, bytes...)."""

    def bad(expected: str) -> ConfigError:
        return ConfigError(f"invalid Linux process state: {where}: expected {expected}, got "
                           f"{type(value).__name__}")

    if kind is FileData:
        return _decode_file_data(value, where)
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        (inner,) = [o for o in options if o is not type(None)]
        return _decode(inner, value, where)
    if isinstance(kind, type) and dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise bad(f"an object for {kind.__name__}")
        hints = typing.get_type_hints(kind)
        fields = {f.name for f in dataclasses.fields(kind)}
        unknown = set(value) - fields
        if unknown:
            raise ConfigError(f"invalid Linux process state: {where}: unknown field "
                              f"{min(unknown)!r}")
        args = {name: _decode(hints[name], value[name], f"{where}.{name}")
                for name in fields if name in value}
        try:
            return kind(**args)
        except TypeError as err:
            raise ConfigError(f"invalid Linux process state: {where}: {err}") from err
    if kind in (bytes, bytearray):
        if not isinstance(value, str):
            raise bad("base64 text")
        try:
            raw = base64.b64decode(value.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError) as err:
            raise bad("base64 text") from err
        return bytearray(raw) if kind is bytearray else raw
    if origin is list:
        (item,) = typing.get_args(kind)
        if not isinstance(value, list):
            raise bad("a list")
        return [_decode(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_kind, item = typing.get_args(kind)
        if not isinstance(value, dict):
            raise bad("an object")
        out: dict[Any, Any] = {}
        for key, v in value.items():
            if key_kind is int:
                try:
                    k: Any = int(key)
                except ValueError as err:
                    raise ConfigError(f"invalid Linux process state: {where}: key {key!r} is "
                                      f"not an integer") from err
            else:
                k = key
            out[k] = _decode(item, v, f"{where}[{key!r}]")
        return out
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise bad("a boolean")
        return value
    if kind is str:
        if not isinstance(value, str):
            raise bad("text")
        return value
    raise TypeError(f"no decoder for {kind!r}")  # a programming error in this module


def _decode_file_data(value: Any, where: str) -> FileData:
    """A FileData from untrusted JSON: the size and each chunk's text length are checked before
    anything is decoded, so no declared size leads to an allocation."""
    if not isinstance(value, dict) or set(value) - {"size", "chunks"}:
        raise ConfigError(f"invalid Linux process state: {where}: expected an object with "
                          f"size and chunks")
    size = _decode(int, value.get("size", 0), f"{where}.size")
    chunks = value.get("chunks", {})
    if not isinstance(chunks, dict):
        raise ConfigError(f"invalid Linux process state: {where}.chunks: expected an object")
    for key, text in chunks.items():
        if isinstance(text, str) and len(text) > _MAX_CHUNK_TEXT:
            raise ConfigError(f"invalid Linux process state: {where}.chunks[{key!r}]: "
                              f"{len(text)} characters, more than a chunk of {CHUNK_SIZE} "
                              f"bytes takes")
    data = FileData(size, _decode(dict[int, bytearray], chunks, f"{where}.chunks"))
    problem = check_file_data(data)
    if problem is not None:
        raise ConfigError(f"invalid Linux process state: {where}: {problem}")
    return data
