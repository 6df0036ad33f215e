"""Before a timed side starts: wait until the previous side's processes have let go of the CPU.

A side's command returns before all of its Ray processes are gone (raylets, agents and workers exit on their
own after the shutdown), and on a 2-core machine their last second of work would be charged to whichever side
runs next. Both sides wait the same way, so the comparison stays fair.
"""
import time


def _busy_and_total():
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def wait_until_quiet(max_busy_cores: float = 0.3, window_s: float = 0.5, timeout_s: float = 30.0) -> float:
    """Block until the machine's CPU use over one window is below max_busy_cores (or timeout_s passed);
    returns the seconds waited. Linux only (/proc/stat); elsewhere it returns at once."""
    t0 = time.time()
    try:
        busy0, total0 = _busy_and_total()
    except OSError:
        return 0.0
    import os

    cores = os.cpu_count() or 1
    while time.time() - t0 < timeout_s:
        time.sleep(window_s)
        busy1, total1 = _busy_and_total()
        share = (busy1 - busy0) / max(total1 - total0, 1)
        busy0, total0 = busy1, total1
        if share * cores < max_busy_cores:
            break
    return round(time.time() - t0, 2)
