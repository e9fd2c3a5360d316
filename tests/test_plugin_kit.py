"""The test kit as a product (issue 16 items 3 and 4): ``pytest --pyvmm-algorithm`` run as a user
runs it (a pytest subprocess with the plugin), against deliberately broken plug-ins (each caught,
by the oracles that should catch it), built-in combinations (they pass), the example plug-in
package installed into a fresh venv (it passes), and bad option values (one usage error line)."""

from __future__ import annotations

import os
import re
import shutil
import site
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "pyvmm-changedpages"
#: the entry point's name is the module's, so -p works whether pyvmm's pytest11 entry point is
#: installed or not
PLUGIN = ("-p", "pyvmm.testing.pytest_plugin")

BROKEN = textwrap.dedent('''
    """Deliberately broken checkpoint algorithms: pyvmm's test kit must catch each."""
    import ctypes
    import dataclasses
    import os
    import time

    from pyvmm.machine import RunState
    from pyvmm.migration.algorithms import resolve
    from pyvmm.migration.savers import StopAndCopySaver

    PAGE = 4096


    class DropsADirtyPage:
        """The async tracker, but each collect forgets the highest page written."""

        kind = "drops-a-dirty-page"

        def __init__(self, blocks, options):
            self.inner = resolve("tracker", "async")(blocks, options)

        def collect(self):
            dirty = self.inner.collect()
            for bitmap in reversed(list(dirty.values())):
                pages = list(bitmap)
                if pages:
                    bitmap.clear(pages[-1])
                    break
            return dirty

        def stop(self):
            self.inner.stop()


    class SavesAfterThePause(StopAndCopySaver):
        """Lets the guest run on at the pause, and saves RAM once the guest has changed it."""

        name = "saves-after-the-pause"

        def at_pause(self, selection, release):
            self.at_pause_ram = self.ram()
            release()

        def ram(self):
            return [bytes(block.mem) for block in self.setup.machine.ram_blocks]

        def save(self, job):
            # the guest writes at once if it runs; the deadline: a guest whose loop ended
            deadline = time.monotonic() + 2
            while (self.setup.machine.state is RunState.RUNNING and time.monotonic() < deadline
                   and self.ram() == self.at_pause_ram):
                time.sleep(0.001)
            return super().save(job)


    class MissesKernelWrites:
        """Compares each page with its copy at the last collect, but the copy follows what the
        kernel writes into guest RAM (os.preadv): blind to kernel-side writes."""

        kind = "misses-kernel-writes"

        def __init__(self, blocks, options):
            self.blocks = list(blocks)
            self.copies = {block.name: bytearray(block.mem) for block in self.blocks}
            self.preadv = os.preadv
            os.preadv = self.kernel_write

        def kernel_write(self, fd, buffers, offset, *flags):
            done = self.preadv(fd, buffers, offset, *flags)
            for buffer in buffers:
                view = memoryview(buffer)
                address = ctypes.addressof(ctypes.c_char.from_buffer(view))
                for block in self.blocks:
                    start = address - block.host_addr
                    if 0 <= start < block.size:
                        self.copies[block.name][start:start + view.nbytes] = view
            return done

        def collect(self):
            changed = {}
            for block in self.blocks:
                bitmap, copy, mem = block.new_bitmap(), self.copies[block.name], block.mem
                for page in range(block.page_count):
                    now = mem[page * PAGE:(page + 1) * PAGE]
                    if copy[page * PAGE:(page + 1) * PAGE] != now:
                        bitmap.set(page)
                        copy[page * PAGE:(page + 1) * PAGE] = now
                changed[block.name] = bitmap
            return changed

        def stop(self):
            if os.preadv == self.kernel_write:
                os.preadv = self.preadv


    class MiscountsZeroPages(StopAndCopySaver):
        """Writes the right records, but counts its zero pages as data pages."""

        name = "miscounts-zero-pages"

        def save(self, job):
            saved = super().save(job)
            return dataclasses.replace(saved, data_pages=saved.data_pages + saved.zero_pages,
                                       zero_pages=0)


    def make_saver(setup):
        return StopAndCopySaver(setup)


    def make_tracker(blocks, options):
        return resolve("tracker", "hash")(blocks, options)


    def make_anything(a, b, c):
        raise AssertionError("never called")
''')

#: broken plug-in -> {kit check that must fail: what its message says (one of)}; every other
#: check of it must pass (the kit does not fail everything it is given)
CAUGHT: dict[str, dict[str, tuple[str, ...]]] = {
    "tracker=broken:DropsADirtyPage": {
        "new-process-reload[increment]": ("differs from the uninterrupted run's",),
        "chain-prefixes[random]": ("does not give the machine at pause",),
    },
    "saver=broken:SavesAfterThePause": {
        "running-equals-stop-and-copy[random]": ("does not give the machine at pause",),
        # the file's checksums (from RAM, which the saver said was as saved) may see it first
        "chain-prefixes[random]": ("does not give the machine at pause", "ChecksumError"),
    },
    "tracker=broken:MissesKernelWrites": {
        "chain-prefixes[random]": ("does not give the machine at pause",),
    },
    "saver=broken:MiscountsZeroPages": {  # the container refuses to commit such an increment
        "new-process-reload[increment]": ("page index holds",),
        "running-equals-stop-and-copy[random]": ("page index holds",),
        "chain-prefixes[random]": ("page index holds",),
    },
}


def kit_run(pytester: pytest.Pytester, *args: str,
            timeout: float = 900) -> tuple[pytest.RunResult, dict[str, tuple[str, str]]]:
    """pytest with the plugin in a new process, in ``pytester``'s directory (the broken
    plug-ins importable there); per test id, its outcome and failure message."""
    pytester.makepyfile(broken=BROKEN)
    result = pytester.runpytest_subprocess(*PLUGIN, "-p", "no:cacheprovider", "-rA", "-vv",
                                           *args, timeout=timeout)
    outcomes = {}
    for line in result.outlines:
        match = re.match(r"(PASSED|FAILED|ERROR) (\S+)(?: - (.*))?$", line)
        if match:
            outcomes[match.group(2)] = (match.group(1), match.group(3) or "")
    return result, outcomes


def kit_outcomes(outcomes: dict[str, tuple[str, str]], algorithm: str) -> dict[str, tuple[str, str]]:
    prefix = f"pyvmm-kit[{algorithm}]::"
    return {test[len(prefix):]: outcome for test, outcome in outcomes.items()
            if test.startswith(prefix)}


def test_each_broken_plugin_is_caught_by_the_oracles(pytester: pytest.Pytester) -> None:
    """A dropped dirty page, a page saved as of the wrong moment, missed kernel-side writes and
    a wrong page count each fail the plugin run, by the oracles that should see them (the state
    machine sees them too: the slow test below); the other oracles pass them."""
    args = [arg for algorithm in CAUGHT for arg in ("--pyvmm-algorithm", algorithm)]
    result, outcomes = kit_run(pytester, *args, "-k", "not state-machine")
    assert result.ret == pytest.ExitCode.TESTS_FAILED, result.stdout.str()
    for algorithm, caught in CAUGHT.items():
        checks = kit_outcomes(outcomes, algorithm)
        assert len(checks) == 3, (algorithm, checks)
        for check, (outcome, message) in checks.items():
            if check in caught:
                assert outcome == "FAILED" and any(text in message for text in caught[check]), \
                    (algorithm, check, outcome, message)
            else:
                assert outcome == "PASSED", (algorithm, check, outcome, message)


@pytest.mark.slow
def test_the_state_machine_catches_each_broken_plugin(pytester: pytest.Pytester) -> None:
    args = [arg for algorithm in CAUGHT for arg in ("--pyvmm-algorithm", algorithm)]
    result, outcomes = kit_run(pytester, *args, "-k", "state-machine")
    for algorithm in CAUGHT:
        checks = kit_outcomes(outcomes, algorithm)
        assert checks and all(outcome == "FAILED" for outcome, _ in checks.values()), \
            (algorithm, checks)
    assert "Falsifying example" in result.stdout.str()  # the steps, shrunk, for the user


def test_a_builtin_combination_passes_the_plugin_run(pytester: pytest.Pytester) -> None:
    """The fast representative of the matrix below: the live saver with the hash tracker."""
    result, outcomes = kit_run(pytester, "--pyvmm-algorithm", "saver=live,tracker=hash")
    assert result.ret == pytest.ExitCode.OK, result.stdout.str()
    assert set(kit_outcomes(outcomes, "saver=live,tracker=hash")) == {
        "state-machine[full]", "state-machine[incremental]", "new-process-reload[increment]",
        "running-equals-stop-and-copy[random]", "chain-prefixes[random]"}


def test_the_compressing_encoder_passes_the_plugin_run(pytester: pytest.Pytester) -> None:
    """An encoder is a part like the others: every oracle runs with zstd records written."""
    result, outcomes = kit_run(pytester, "--pyvmm-algorithm", "encoder=zstd")
    assert result.ret == pytest.ExitCode.OK, result.stdout.str()
    assert set(kit_outcomes(outcomes, "encoder=zstd")) == {
        "state-machine[full]", "state-machine[incremental]", "new-process-reload[increment]",
        "running-equals-stop-and-copy[random]", "chain-prefixes[random]"}


@pytest.mark.slow
def test_every_builtin_combination_passes_the_plugin_run(pytester: pytest.Pytester) -> None:
    algorithms = [f"saver={saver},tracker={tracker}" for saver in ("stop-and-copy", "live", "cow")
                  for tracker in ("async", "wp", "hash")]
    result, outcomes = kit_run(pytester, *(arg for algorithm in algorithms
                                           for arg in ("--pyvmm-algorithm", algorithm)))
    assert result.ret == pytest.ExitCode.OK, result.stdout.str()
    for algorithm in algorithms:
        assert len(kit_outcomes(outcomes, algorithm)) == 5, algorithm


@pytest.mark.slow
def test_the_long_profile_runs_more(pytester: pytest.Pytester) -> None:
    result, outcomes = kit_run(pytester, "--pyvmm-algorithm", "hash", "--pyvmm-profile", "long")
    assert result.ret == pytest.ExitCode.OK, result.stdout.str()
    assert len(kit_outcomes(outcomes, "tracker=hash")) == 12


def test_the_example_package_installs_into_a_fresh_venv_and_passes_the_plugin_run(
        tmp_path: Path) -> None:
    """As its README says: pip install -e, pyvmm lists it, the kit run by its name passes
    (with the package's own test, which uses the kit's fixtures)."""
    source = tmp_path / "pyvmm-changedpages"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    venv = tmp_path / "venv"
    # pyvmm and its dependencies come from this environment: no network
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip",
                    venv], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    # --system-site-packages reaches the base interpreter's packages only: when this suite
    # runs in a venv itself, its site directories (pyvmm's editable install) are added too
    inner = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                           capture_output=True, text=True, timeout=120, check=True).stdout.strip()
    outer = [path for path in site.getsitepackages() if os.path.isdir(path)]
    Path(inner, "outer-environment.pth").write_text(
        "".join(f"import site; site.addsitedir({path!r})\n" for path in outer))
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "install", "--quiet",
         "--disable-pip-version-check", "--no-deps", "--no-build-isolation", "-e", source],
        capture_output=True, text=True, timeout=300, check=False)
    # (setuptools before 70.1 builds the editable wheel with the wheel package: a test extra)
    assert install.returncode == 0, install.stdout + install.stderr
    listed = subprocess.run([python, "-m", "pyvmm", "algorithms"], capture_output=True,
                            text=True, timeout=120, check=True)
    assert re.search(r"^  changed .*\[pyvmm-changedpages\]$", listed.stdout, re.MULTILINE), \
        listed.stdout
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PYTHONPATH", None)  # what the venv has, nothing else
    run = subprocess.run([python, "-m", "pytest", *PLUGIN, "--pyvmm-algorithm", "changed",
                          "-p", "no:cacheprovider", "-rA"], cwd=source, env=env,
                         capture_output=True, text=True, timeout=900, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    passed = set(re.findall(r"^PASSED (\S+)", run.stdout, re.MULTILINE))
    assert passed == {
        "test_changedpages.py::test_a_page_rewritten_with_its_own_bytes_is_not_saved_again",
        *(f"pyvmm-kit[tracker=changed]::{check}" for check in (
            "state-machine[incremental]", "new-process-reload[increment]",
            "running-equals-stop-and-copy[random]", "chain-prefixes[random]")),
    }, run.stdout[-3000:]


@pytest.mark.parametrize(("value", "message"), [
    ("nope", "--pyvmm-algorithm: unknown algorithm 'nope' (trackers: async, wp, hash"),
    ("broken:Missing", "--pyvmm-algorithm: algorithm broken:Missing: cannot load it"),
    ("broken:make_anything",
     "cannot tell whether broken:make_anything is a tracker, a saver or an encoder"),
    ("saver=nope", "--pyvmm-algorithm: unknown saver 'nope' (choose from stop-and-copy"),
    ("saver=live,saver=cow", "names two savers"),
    ("engine=live", "'engine' is neither saver, tracker nor encoder"),
])
def test_negative_a_bad_algorithm_is_one_usage_error(pytester: pytest.Pytester, value: str,
                                                      message: str) -> None:
    pytester.makepyfile(broken=BROKEN)
    pytester.syspathinsert()
    result = pytester.runpytest(*PLUGIN, "--pyvmm-algorithm", value)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    errors = [line for line in result.errlines if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("ERROR: --pyvmm-algorithm: ") and \
        message in errors[0], result.errlines


def test_what_a_part_is_is_told_from_its_name_or_its_shape(pytester: pytest.Pytester) -> None:
    """A registered name by its registry, module:attribute by what the object is: a class with
    save() or collect(), a factory of one argument (a saver's) or two (a tracker's)."""
    pytester.makepyfile(broken=BROKEN)
    pytester.syspathinsert()
    given = ["live", "wp", "broken:SavesAfterThePause", "broken:MissesKernelWrites",
             "broken:make_saver", "broken:make_tracker", "saver=cow,tracker=broken:make_tracker"]
    result = pytester.runpytest(*PLUGIN, "--collect-only", "-q",
                                *(arg for value in given for arg in ("--pyvmm-algorithm", value)))
    kits = {line.split("::")[0] for line in result.outlines if line.startswith("pyvmm-kit[")}
    assert kits == {"pyvmm-kit[saver=live]", "pyvmm-kit[tracker=wp]",
                    "pyvmm-kit[saver=broken:SavesAfterThePause]",
                    "pyvmm-kit[tracker=broken:MissesKernelWrites]",
                    "pyvmm-kit[saver=broken:make_saver]", "pyvmm-kit[tracker=broken:make_tracker]",
                    "pyvmm-kit[saver=cow,tracker=broken:make_tracker]"}


def test_the_fixtures_run_a_users_test_once_per_algorithm(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_mine='''
        import pytest
        from pyvmm.migration.checkpoint import reload
        from pyvmm.testing.digest import ram_digest

        @pytest.mark.pyvmm_capabilities("incremental", "checksum")
        def test_chain(pyvmm_machine, pyvmm_checkpointer, pyvmm_checkpoint_file):
            for _ in range(3):
                pyvmm_machine.run(max_insns=100_000)
                pyvmm_checkpointer.checkpoint()
            assert {"checksum", "incremental"} <= set(pyvmm_checkpointer.capabilities)
            with reload(f"chpt:{pyvmm_checkpoint_file}") as reloaded:
                assert ram_digest(reloaded) == ram_digest(pyvmm_machine)
    ''')
    result = pytester.runpytest(*PLUGIN, "-k", "not pyvmm-kit", "-v", "--pyvmm-algorithm", "cow",
                                "--pyvmm-algorithm", "hash", "--hypothesis-profile", "pyvmm-ci")
    result.assert_outcomes(passed=2, deselected=9)  # the kit's 5 + 4
    result.stdout.fnmatch_lines(["*test_chain?saver=cow? PASSED*",
                                 "*test_chain?tracker=hash? PASSED*"])
