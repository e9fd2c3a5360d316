"""The fork-based ("cow") snapshot writer: a child process saves RAM as it was at the fork.

DESIGN.md §4: with the machine paused (the consistency point) :func:`start_cow_snapshot`
forks; the child writes the RAM page records of every job and then the rest of the stream
(``tail``) into the file, while the parent returns at once and may resume the guest. The guest's
writes land in private copy-on-write copies the child never sees, so the file holds RAM exactly
as it was at the fork. RamBlocks are private anonymous mappings (``pyvmm_ram_mmap``), which is
what makes this work: shared memory would not be copied.

The child never runs Python (only the forking thread exists in it, and others may have held the
GIL or other locks): C writes the records (the same ``pyvmm_write_page_records`` that
:func:`~pyvmm.migration.pageio.write_page_records` calls, hence the same bytes), reports into a
``MAP_SHARED`` area mapped before the fork, and ``_exit``\\ s. :class:`CowSnapshot` reaps it and
turns the area into a :class:`CowResult`, or a :class:`CowError` for a child that failed or died.

A caller with a buffered stream flushes it before :func:`start_cow_snapshot` and passes the fd's
end as ``file_offset`` (the child writes with ``pwrite`` at explicit offsets); the file holds
``file_offset + result.bytes_written`` bytes of stream once :meth:`CowSnapshot.wait` returns.
"""

from __future__ import annotations

import os
import select
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pyvmm._native import ffi, lib
from pyvmm.errors import PyvmmError
from pyvmm.migration.pageio import PageRuns, PageWriteResult
from pyvmm.ram import PageBitmap, RamBlock

CHILD_DELAY_ENV = "PYVMM_COW_CHILD_DELAY_MS"
"""Test hook: milliseconds the child sleeps before writing (read when ``child_delay`` is None)."""

CowJob = tuple[RamBlock, PageBitmap, bool]
"""``(block, pages to save, first_has_idstr)``: one block's share of the RAM PART section."""


class CowError(PyvmmError):
    """The snapshot child failed or died; nothing it wrote may be trusted.

    Fields: ``pid``; ``errno`` (the OS error the child hit, else ``None``); ``signal`` (the
    signal that killed it, else ``None``); ``exit_status`` (its exit code when it exited, else
    ``None``); ``stage`` (``"block NAME"`` or ``"tail"``: what it was writing, when known) and
    ``offset`` (file offset where its writing stopped, when known).
    """

    def __init__(
        self,
        message: str,
        *,
        pid: int,
        errno: int | None = None,
        signal: int | None = None,
        exit_status: int | None = None,
        stage: str | None = None,
        offset: int | None = None,
    ) -> None:
        super().__init__(message)
        self.pid = pid
        self.errno = errno
        self.signal = signal
        self.exit_status = exit_status
        self.stage = stage
        self.offset = offset


@dataclass(frozen=True)
class CowResult:
    """What the child wrote: ``bytes_written`` from ``file_offset`` on (records and tail)."""

    bytes_written: int
    data_pages: int
    zero_pages: int
    blocks: tuple[PageWriteResult, ...]
    """Per job, in order: its records' bytes, page counts and runs (file offsets absolute)."""
    fork_ms: float
    """How long ``fork()`` took in the parent (the part of the pause it adds)."""
    compressed_pages: int = 0
    compressed_bytes: int = 0


def _align8(n: int) -> int:
    return (n + 7) & ~7


class _SharedArea:
    """The ``MAP_SHARED`` result area: result header, per-job stats, then the run array."""

    def __init__(self, njobs: int, total_runs: int) -> None:
        self.stats_at = _align8(ffi.sizeof("struct pyvmm_cow_result"))
        self.runs_at = self.stats_at + _align8(njobs * ffi.sizeof("struct pyvmm_page_write_stats"))
        self.length = self.runs_at + max(total_runs, 1) * ffi.sizeof("struct pyvmm_page_run")
        ptr = lib.pyvmm_cow_area_map(self.length)
        if ptr == ffi.NULL:
            err = ffi.errno
            raise CowError(
                f"cannot map the {self.length}-byte snapshot result area: "
                f"{os.strerror(err)} (errno {err})",
                pid=0,
                errno=err,
            )
        self._ptr: Any = ptr
        base = ffi.cast("char *", ptr)
        self.result: Any = ffi.cast("struct pyvmm_cow_result *", base)
        self.stats: Any = ffi.cast("struct pyvmm_page_write_stats *", base + self.stats_at)
        self.runs: Any = ffi.cast("struct pyvmm_page_run *", base + self.runs_at)

    def release(self) -> None:
        if self._ptr is not None:
            lib.pyvmm_cow_area_unmap(self._ptr, self.length)
            self._ptr = None


class CowSnapshot:
    """A running snapshot child; :meth:`wait` (or :meth:`cancel`) reaps it and frees its area.

    Dropped unreaped, it reaps a finished child without blocking; a child still running then
    stays a zombie once done, and its area stays mapped. Methods run on any thread, one thread
    at a time; they never touch guest RAM.
    """

    def __init__(
        self,
        pid: int,
        area: _SharedArea,
        names: Sequence[str],
        first_runs: Sequence[int],
        file_offset: int,
        fork_ns: int,
    ) -> None:
        """Wrap a forked child; made by :func:`start_cow_snapshot` only."""
        self.pid = pid
        self.file_offset = file_offset
        self.fork_ms = fork_ns / 1e6
        """How long ``fork()`` took in the parent."""
        self._area: _SharedArea | None = area
        self._names = list(names)
        self._first_runs = list(first_runs)  # where each job's runs start in the shared array
        self._status: int | None = None  # waitpid status once reaped
        self._outcome: CowResult | CowError | None = None

    # -- reaping ---------------------------------------------------------------------------------

    def _reap(self, flags: int) -> bool:
        if self._status is not None:
            return True
        pid, status = os.waitpid(self.pid, flags)  # PEP 475: EINTR is retried
        if pid == 0:
            return False
        self._status = status
        return True

    def poll(self) -> bool:
        """Whether the child has finished (reaping it if so); never blocks."""
        return self._reap(os.WNOHANG)

    def wait(self, timeout: float | None = None) -> CowResult:
        """Wait for the child and return what it wrote; the result area is released after.

        Raises :class:`CowError` if the child failed (its errno), was killed by a signal, or
        exited unexpectedly; ``TimeoutError`` if it is still running after ``timeout`` seconds
        (it keeps running; call again or :meth:`cancel`). Repeated calls give the same outcome.
        """
        if not self._reap(os.WNOHANG):
            if timeout is None:
                self._reap(0)
            else:
                deadline = time.monotonic() + timeout
                while not self._wait_exit(deadline - time.monotonic()):
                    if time.monotonic() >= deadline:
                        raise TimeoutError(
                            f"snapshot child {self.pid} still running after {timeout} s"
                        )
        if self._outcome is None:
            self._outcome = self._collect()
        if isinstance(self._outcome, CowError):
            raise self._outcome
        return self._outcome

    def _wait_exit(self, seconds: float) -> bool:
        """Block up to ``seconds`` for the child to exit; reap it if it did."""
        seconds = max(seconds, 0.0)
        try:
            pidfd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):
            time.sleep(min(seconds, 0.01))  # no pidfd: poll
            return self._reap(os.WNOHANG)
        try:
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            poller.poll(int(seconds * 1000) + 1)
        finally:
            os.close(pidfd)
        return self._reap(os.WNOHANG)

    def cancel(self) -> None:
        """Kill the child (if still running) and reap it; its file bytes are worthless."""
        if self._status is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:  # pragma: no cover - a zombie still accepts signals
                pass
            self._reap(0)
        if self._outcome is None:
            self._outcome = CowError(
                f"snapshot child {self.pid} was cancelled", pid=self.pid,
                signal=int(signal.SIGKILL))
            self._release()

    def __del__(self) -> None:
        # a forgotten child: reap it if it is done so no zombie stays; never block here
        if getattr(self, "_status", 0) is None:
            try:
                self._reap(os.WNOHANG)
            except OSError:
                pass
        area = getattr(self, "_area", None)
        if area is not None and getattr(self, "_status", None) is not None:
            area.release()

    # -- the outcome -----------------------------------------------------------------------------

    def _release(self) -> None:
        if self._area is not None:
            self._area.release()
            self._area = None

    def _collect(self) -> CowResult | CowError:
        area = self._area
        assert area is not None and self._status is not None
        try:
            return self._interpret(area, self._status)
        finally:
            self._release()

    def _stage_name(self, stage: int) -> str:
        return f"block {self._names[stage]!r}" if stage < len(self._names) else "tail"

    def _interpret(self, area: _SharedArea, status: int) -> CowResult | CowError:
        res = area.result
        written = int(res.bytes_written)
        where = f"snapshot child {self.pid}"
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            try:
                name = signal.Signals(sig).name
            except ValueError:
                name = f"signal {sig}"
            return CowError(
                f"{where} was killed by {name} after writing {written} bytes",
                pid=self.pid, signal=sig, offset=self.file_offset + written)
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -1
        state = int(res.status)
        if code == lib.PYVMM_COW_EXIT_FAILED and state == lib.PYVMM_COW_FAILED:
            err = int(res.error)
            stage = self._stage_name(int(res.stage))
            offset = self.file_offset + written
            return CowError(
                f"{where} could not write {stage} at offset {offset}: "
                f"{os.strerror(err)} (errno {err})",
                pid=self.pid, errno=err, exit_status=code, stage=stage, offset=offset)
        if code != 0 or state != lib.PYVMM_COW_DONE:
            return CowError(
                f"{where} exited with status {code} without reporting a result",
                pid=self.pid, exit_status=code)
        blocks = []
        for i, first_run in enumerate(self._first_runs):
            st = area.stats[i]
            nruns = int(st.nruns)
            array: Any = ffi.new("struct pyvmm_page_run[]", max(nruns, 1))
            ffi.memmove(array, area.runs + first_run, nruns * ffi.sizeof("struct pyvmm_page_run"))
            blocks.append(PageWriteResult(
                bytes_written=int(st.bytes_written), data_pages=int(st.data_pages),
                zero_pages=int(st.zero_pages), runs=PageRuns._adopt(array, nruns),
                compressed_pages=int(st.compressed_pages),
                compressed_bytes=int(st.compressed_bytes)))
        return CowResult(
            bytes_written=written,
            data_pages=sum(b.data_pages for b in blocks),
            zero_pages=sum(b.zero_pages for b in blocks),
            blocks=tuple(blocks),
            fork_ms=self.fork_ms,
            compressed_pages=sum(b.compressed_pages for b in blocks),
            compressed_bytes=sum(b.compressed_bytes for b in blocks),
        )


def _child_delay_ns(child_delay: float | None) -> int:
    if child_delay is None:
        text = os.environ.get(CHILD_DELAY_ENV, "")
        try:
            child_delay = float(text) / 1e3 if text else 0.0
        except ValueError:
            child_delay = 0.0
    return max(int(child_delay * 1e9), 0)


def start_cow_snapshot(
    fd: int,
    file_offset: int,
    jobs: Sequence[CowJob],
    tail: bytes,
    *,
    detect_zero: bool = True,
    compress_level: int = 0,
    child_delay: float | None = None,
) -> CowSnapshot:
    """Fork a child that writes ``jobs``' page records from ``file_offset`` of ``fd``, then ``tail``.

    Call with the guest paused: the child saves RAM as it is at the fork. Each job is
    ``(block, pages, first_has_idstr)`` and gives the same records, in the same place relative
    to where its block's records start, as :func:`~pyvmm.migration.pageio.write_page_records`
    would; the jobs' records follow each other, and ``tail`` (the rest of the stream: the PART
    section's EOS, footer, END section, device sections, trailer) follows the last. ``pages``
    is copied before the fork; the blocks may be written as soon as this returns.

    ``detect_zero``, ``compress_level``: as for write_page_records.  ``child_delay`` (seconds; ``None`` reads :data:`CHILD_DELAY_ENV`) makes the child sleep
    before writing, a window for tests to kill it in.

    Returns at once with the child running. Raises ``ValueError`` for a bitmap that does not fit
    its block or a negative offset, :class:`CowError` if the area cannot be mapped or ``fork``
    fails. Run it on the thread that paused the machine; the GIL is released during the fork.
    """
    if file_offset < 0:
        raise ValueError(f"file offset {file_offset} is negative")
    njobs = len(jobs)
    selections: list[PageBitmap] = []
    first_runs: list[int] = []
    total = 0
    for block, pages, _ in jobs:
        if pages.npages != block.page_count:
            raise ValueError(
                f"bitmap of {pages.npages} pages used with RAM block {block.name!r} "
                f"of {block.page_count} pages"
            )
        selected = pages.copy()  # private: its count bounds the runs the child may write
        selections.append(selected)
        first_runs.append(total)
        total += selected.count()
    area = _SharedArea(njobs, total)
    try:
        c_jobs: Any = ffi.new("struct pyvmm_cow_job[]", max(njobs, 1))
        keep: list[Any] = []  # the idstr buffers, alive until the fork has copied them
        for i, ((block, _, first_has_idstr), selected) in enumerate(zip(jobs, selections)):
            idstr = ffi.new("unsigned char[]", block.name.encode())
            keep.append(idstr)
            job = c_jobs[i]
            job.base = ffi.cast("void *", block.host_addr)
            job.npages = block.page_count
            job.select = ffi.cast("pyvmm_u64 *", selected.address)
            job.idstr = idstr
            job.idstr_len = len(block.name.encode())
            job.first_has_idstr = 1 if first_has_idstr else 0
            job.detect_zero = 1 if detect_zero else 0
            job.level = compress_level
            job.runs_index = first_runs[i]
            job.max_runs = selected.count()
        fork_ns = ffi.new("pyvmm_u64 *")
        # the exported buffers keep every block mapped across the fork, should another thread
        # close one meanwhile
        mems = [ffi.from_buffer(block.mem) for block, _, _ in jobs]
        pid = lib.pyvmm_cow_start(
            fd, file_offset, c_jobs, njobs, tail, len(tail), area.result, area.stats,
            area.runs, _child_delay_ns(child_delay), fork_ns)
        del mems, keep
    except BaseException:
        area.release()
        raise
    if pid < 0:
        area.release()
        err = -pid
        raise CowError(
            f"cannot fork the snapshot child: {os.strerror(err)} (errno {err})",
            pid=0, errno=err)
    return CowSnapshot(pid, area, [block.name for block, _, _ in jobs], first_runs,
                       file_offset, int(fork_ns[0]))
