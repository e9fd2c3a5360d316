"""Start-up time of pyvmm's commands against the interpreter's own start, measured in the same run.

Each command runs as a new process (``python -m pyvmm ...``), wall time from spawn to exit:
  run    : ``run --max-insns 1 -q`` of the built-in guest (boot, one instruction, exit: an upper
           bound of the time to the guest's first instruction)
  help   : ``--help``
  info   : ``checkpoint info FILE`` of a one-increment file (written before, untimed)
Baselines, the same way: ``python -c pass`` (interpreter start with this environment's site
packages) and ``python -c "import unicorn"`` (the CPU library every guest needs). The cases are
timed in interleaved rounds; best and median of ``--repeat`` are printed (2 shared cores: the
medians move with other tenants' load, the best times much less).

Bytecode: by default the children compile into a private ``PYTHONPYCACHEPREFIX`` that one
untimed round fills first, as an installed package has its ``.pyc`` files; ``--no-bytecode-cache``
measures with ``PYTHONDONTWRITEBYTECODE=1`` and no cache (every module compiled at every start).
Then one ``python -X importtime`` run of ``run`` says where the time goes.
Target (issue 14): ``run`` <= 0.1 s.

    python benchmarks/bench_startup.py [--repeat 15] [--no-bytecode-cache]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_S = 0.1


def child_env(cache: Path | None) -> dict[str, str]:
    """The children's environment: pyvmm importable from this tree, bytecode as asked."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    if cache is None:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        env.pop("PYTHONPYCACHEPREFIX", None)
    else:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(cache)
    return env


def wall(cmd: list[str], env: dict[str, str], cwd: Path) -> float:
    """Seconds from spawning ``cmd`` to its exit (which must be 0)."""
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, check=False)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}: "
                         f"{proc.stderr.decode(errors='replace')[-500:]}")
    return elapsed


def import_costs(cmd: list[str], env: dict[str, str], cwd: Path) -> dict[str, int]:
    """Cumulative import time in microseconds per module of one ``-X importtime`` run."""
    proc = subprocess.run([cmd[0], "-X", "importtime", *cmd[1:]], env=env, cwd=cwd,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          check=False)
    costs: dict[str, int] = {}
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            _, cumulative, name = line.split("|")
            if cumulative.strip().isdigit():
                costs[name.strip()] = int(cumulative)
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--no-bytecode-cache", action="store_true",
                        help="compile every module at every start (PYTHONDONTWRITEBYTECODE=1)")
    args = parser.parse_args()
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        env = child_env(None if args.no_bytecode_cache else work / "pycache")
        chpt = work / "c.bin"
        wall([py, "-m", "pyvmm", "run", "-q", "--max-insns", "1", "--no-fsync",
              "--checkpoint", f"chpt:{chpt}"], env, work)  # also fills the bytecode cache
        cases = {
            "python -c pass": [py, "-c", "pass"],
            "python -c 'import unicorn'": [py, "-c", "import unicorn"],
            "pyvmm run --max-insns 1": [py, "-m", "pyvmm", "run", "-q", "--max-insns", "1"],
            "pyvmm --help": [py, "-m", "pyvmm", "--help"],
            "pyvmm checkpoint info FILE": [py, "-m", "pyvmm", "checkpoint", "info", str(chpt)],
        }
        for cmd in cases.values():  # untimed: every module's bytecode cached, files warm
            wall(cmd, env, work)
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.repeat):
            for name, cmd in cases.items():
                times[name].append(wall(cmd, env, work))
        costs = import_costs(cases["pyvmm run --max-insns 1"], env, work)

    best = {name: min(t) for name, t in times.items()}
    med = {name: statistics.median(t) for name, t in times.items()}
    base, uc = "python -c pass", "python -c 'import unicorn'"
    print(f"wall time spawn -> exit, best (median) of {args.repeat}; bytecode "
          f"{'NOT cached (compiled at each start)' if args.no_bytecode_cache else 'cached'}")
    for name in cases:
        line = f"  {name:30s} {best[name] * 1e3:6.1f} ms ({med[name] * 1e3:6.1f})"
        if name != base:
            line += f"   {best[name] / best[base]:5.2f}x python"
        if name not in (base, uc):
            line += f"   {best[name] / best[uc]:5.2f}x import unicorn"
        if name == "pyvmm run --max-insns 1":
            line += f"   [target <= {TARGET_S * 1e3:.0f} ms: " \
                    f"{'met' if best[name] <= TARGET_S else 'MISSED'}]"
        print(line)
    run = best["pyvmm run --max-insns 1"]
    cli = costs.get("pyvmm.cli", 0) / 1e6
    parts = [("interpreter start (python -c pass)", best[base]),
             ("import pyvmm.cli (one -X importtime run)", cli)]
    parts += [(f"  of which {name}", costs[name] / 1e6)
              for name in ("unicorn", "pyvmm.machine", "pyvmm.migration.vmstate",
                           "pyvmm.guests.workload", "dataclasses", "argparse") if name in costs]
    parts.append(("keystone (imported to assemble the workload)", costs.get("keystone", 0) / 1e6))
    parts.append(("the rest: parse, assemble, build the machine, run, exit",
                  run - best[base] - cli - costs.get("keystone", 0) / 1e6))
    print(f"where pyvmm run's {run * 1e3:.1f} ms go (cumulative import times, nested: "
          f"pyvmm.machine includes unicorn; each includes -X importtime's own overhead):")
    for label, seconds in parts:
        print(f"  {label:58s} {seconds * 1e3:6.1f} ms")


if __name__ == "__main__":
    main()
