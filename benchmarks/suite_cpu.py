"""Where the test suite's CPU goes: a pytest plugin that records, for every test's setup, call
and teardown, the wall seconds and the machine's CPU seconds from ``/proc/stat``, split into
normal CPU (the test and the Ray processes it drives) and nice CPU (the overfit fits, which run
at nice 19 in the background, tests/fitting.py), and prints them per module and per test at the
end of the session.

    PYTHONPATH=benchmarks uv run pytest -p suite_cpu [--suite-cpu-top 30] [--suite-cpu-tsv FILE]

Linux only (``/proc/stat``). The figures are the whole machine's: run it with nothing else busy.
On a CPU-bound machine the suite's wall time is about its CPU seconds over the cores, so the
tests with the most CPU are the ones to cut.
"""

from __future__ import annotations

import collections
import os
import time

import pytest

_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_ROWS: list[tuple[str, str, float, float, float, float]] = []


def _cpu() -> tuple[float, float, float]:
    """(normal, nice, idle) CPU seconds of the machine since boot."""
    with open("/proc/stat") as f:
        user, nice, system, idle, _iowait, irq, softirq = (int(x) for x in f.readline().split()[1:8])
    return (user + system + irq + softirq) / _HZ, nice / _HZ, idle / _HZ


def pytest_addoption(parser):
    group = parser.getgroup("suite_cpu")
    group.addoption("--suite-cpu-top", type=int, default=30, help="tests to list, most CPU first")
    group.addoption("--suite-cpu-tsv", default=None, help="also write every row to this TSV file")


def _recorder(phase: str):
    @pytest.hookimpl(hookwrapper=True)
    def hook(item, *args, **kwargs):
        t0, c0 = time.time(), _cpu()
        yield
        t1, c1 = time.time(), _cpu()
        _ROWS.append((item.nodeid, phase, t1 - t0, c1[0] - c0[0], c1[1] - c0[1], c1[2] - c0[2]))

    return hook


pytest_runtest_setup = _recorder("setup")
pytest_runtest_call = _recorder("call")
pytest_runtest_teardown = _recorder("teardown")


def pytest_terminal_summary(terminalreporter, config):
    if not _ROWS:
        return
    write = terminalreporter.write_line
    if config.getoption("--suite-cpu-tsv"):
        with open(config.getoption("--suite-cpu-tsv"), "w") as f:
            f.write("test\tphase\twall_s\tcpu_s\tnice_s\tidle_s\n")
            f.writelines("%s\t%s\t%.2f\t%.2f\t%.2f\t%.2f\n" % r for r in _ROWS)
    total = [sum(r[i] for r in _ROWS) for i in range(2, 6)]
    write("")
    write("suite CPU (machine-wide, /proc/stat): wall %.0f s, CPU %.0f s, nice CPU (fits) %.0f s, idle %.0f s" % tuple(total))
    for title, key in (("per module", lambda r: r[0].split("::")[0]), ("per test", lambda r: r[0])):
        acc: dict[str, list[float]] = collections.defaultdict(lambda: [0.0] * 4)
        for r in _ROWS:
            for i in range(4):
                acc[key(r)][i] += r[2 + i]
        items = sorted(acc.items(), key=lambda kv: -kv[1][1])
        if title == "per test":
            items = items[:config.getoption("--suite-cpu-top")]
        write(f"{title}, most CPU first: wall / CPU / nice / idle seconds")
        for name, (w, c, n, i) in items:
            write(f"  {w:6.0f} {c:6.0f} {n:6.0f} {i:6.0f}  {name}")
