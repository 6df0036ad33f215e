"""A host's log (host 0 by default; --follow until the run's launcher is gone), or with --first-error the host
the run's latest failure is blamed on, with its first error line and its traceback.

Blame is the supervisor's (launcher/blame.py over launcher/classify.py): the hosts' exit codes, reasons and
phases, in the order their heartbeats recorded them failing. Cloud runs read the same files: the supervisor
syncs each host's log into the run directory's logs/ on the head and mirrors them to the run's bucket
(launcher/mirror.py), pulled here first.
"""
import sys
import time
from datetime import datetime

from launcher.blame import blame, first_error
from launcher.commands.common import add_root, refresh, resolve_run
from launcher.errors import UserError
from launcher.rundir import RunDir
from trainer import runfiles

HELP = "a host's log (--host I, --follow), or the host that failed first (--first-error)"
POLL_S = 0.5


def add_arguments(p) -> None:
    p.add_argument("run", metavar="RUN", help="a run directory or a run name under --root")
    p.add_argument("--host", type=int, default=0, metavar="I", help="the host whose log to print (default 0)")
    p.add_argument("--follow", "-f", action="store_true",
                   help="keep printing new lines until the run's launcher is gone (or Ctrl-C)")
    p.add_argument("--first-error", action="store_true",
                   help="the host that failed first, its first error line and its traceback")
    add_root(p)


def _host_log(run_dir: str, host: int) -> str:
    hosts = runfiles.host_ids(run_dir)
    if host not in hosts:
        have = ", ".join(str(i) for i in hosts) or "none yet"
        raise UserError("--host", f"run {run_dir} has no log of host {host} (hosts with logs: {have})",
                        "pick one of those")
    return runfiles.host_log(run_dir, host)


def _follow(path: str, run_dir: str) -> None:
    lock = RunDir(run_dir)
    with open(path, "rb") as f:
        while True:
            chunk = f.read()
            if chunk:
                sys.stdout.write(chunk.decode(errors="replace"))
                sys.stdout.flush()
            elif not lock.is_locked():
                return
            else:
                time.sleep(POLL_S)


def _first_error(run_dir: str) -> int:
    b = blame(run_dir)
    if b is None:
        print(f"no failure in run {run_dir}")
        return 0
    log = runfiles.host_log(run_dir, b.host)
    try:
        with open(log, errors="replace") as f:
            line, traceback = first_error(f.read())
    except FileNotFoundError:
        line, traceback = None, []
    when = datetime.fromtimestamp(b.time).strftime("%Y-%m-%d %H:%M:%S") if b.time is not None else "unknown time"
    code = f", exit code {b.code}" if b.code is not None else ""
    earlier = f" (the latest of {b.failures} failures)" if b.failures > 1 else ""
    print(f"host {b.host} failed first: attempt {b.attempt} at {when}{code}; {b.cause}: {b.detail}{earlier}")
    print(f"log: {log}")
    print(f"first error: {line if line is not None else '(no error line in its log)'}")
    if traceback:
        print("\n".join(traceback))
    return 0


def run(args) -> int:
    run_dir = refresh(resolve_run(args.run, args.root))
    if args.first_error:
        return _first_error(run_dir)
    if args.host < 0:
        raise UserError("--host", f"{args.host} is not a host number", "hosts are numbered from 0")
    path = _host_log(run_dir, args.host)
    try:
        if args.follow:
            _follow(path, run_dir)
        else:
            with open(path, "rb") as f:
                sys.stdout.write(f.read().decode(errors="replace"))
    except KeyboardInterrupt:
        pass  # Ctrl-C ends a follow; the run goes on
    except BrokenPipeError:
        pass  # `tpu-launch logs RUN | head`: the reader has what it wanted
    return 0
