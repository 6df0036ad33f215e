"""What every `tpu-launch` command shares: finding a run (a directory, or a name under --root) and its errors."""
import argparse
import glob
import os
import sys
from typing import List

from launcher.errors import UserError
from trainer import runfiles

DEFAULT_ROOT = "runs"  # where run.dir puts runs by default (runs/${run.name}, relative to where you launch)


def add_root(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", default=DEFAULT_ROOT,
                   help=f"the directory that holds runs by name (default: {DEFAULT_ROOT})")


def is_run_dir(path: str) -> bool:
    """A directory some launch wrote: it has the config, the summary or the lock of a run."""
    return any(os.path.exists(os.path.join(path, f)) for f in (runfiles.CONFIG, runfiles.SUMMARY, runfiles.LOCK))


def resolve_run(run: str, root: str = DEFAULT_ROOT) -> str:
    """A run directory from a path or a run name under `root`; a one-line UserError (exit 2) if there is none."""
    for candidate in (run, os.path.join(root, run)):
        if os.path.isdir(candidate) and is_run_dir(candidate):
            return os.path.abspath(candidate)
    raise UserError("RUN", f"no run '{run}' (neither a run directory nor a run under {os.path.abspath(root)})",
                    "pass a run directory, a run name under --root, or see `tpu-launch status` for the runs")


def refresh(run_dir: str) -> str:
    """Every command reads a run directory through this: a cloud run's directory is on its head, so its mirror in the
    run's bucket is pulled here first (launcher/mirror.py; a local run: nothing). If the mirror cannot be read, one
    warning line on stderr, and the command goes on with the files here. Returns run_dir."""
    from launcher import mirror

    warning = mirror.refresh(run_dir)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    return run_dir


def all_runs(root: str = DEFAULT_ROOT) -> List[str]:
    """Every run directory directly under `root`, by name."""
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return []
    return [os.path.abspath(os.path.join(root, n)) for n in names if is_run_dir(os.path.join(root, n))]


def local_jax_platform() -> None:
    """For the commands that run JAX in this process (eval, generate), before JAX is imported: on a machine with no
    TPU (no /dev/accel*, no /dev/vfio/<n>) JAX runs on the CPU, so libtpu (installed with the tpu extra) does not
    probe for a TPU and print its warnings. JAX_PLATFORMS set by the user wins."""
    if "JAX_PLATFORMS" not in os.environ and not glob.glob("/dev/accel*") and not glob.glob("/dev/vfio/[0-9]*"):
        os.environ["JAX_PLATFORMS"] = "cpu"
