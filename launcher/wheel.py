"""Build the project's wheel reproducibly and stage it, content-addressed, in the run's bucket for the TPU VMs."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

from launcher.errors import UserError
from trainer.data.storage import GCS_SCHEME, open_store

log = logging.getLogger(__name__)

KEY = "cluster.bucket"
WHEELS_DIR = "wheels"
DIGEST_CHARS = 12
# Fixed zip timestamps (1980-01-01, the zip epoch) so the same sources always give the same wheel bytes,
# hence the same content address: a relaunch with unchanged code re-uses the uploaded wheel.
SOURCE_DATE_EPOCH = "315532800"
BUILD_TIMEOUT_S = 600

# What the build needs from the checkout besides the package directories (those holding __init__.py).
_PACKAGING_FILES = re.compile(r"^(pyproject\.toml|setup\.py|setup\.cfg|MANIFEST\.in|(README|LICENSE|COPYING|NOTICE)[^/]*)$")
_SKIP_DIRS = {"build", "dist", "tests", "runs", "outputs", "multirun"}
# GCS bucket names: 3-222 chars of lowercase letters, digits, '-', '_' and '.', starting/ending alphanumeric.
_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")
# pip's generic lines ("error: subprocess-exited-with-error", "error: metadata-generation-failed", ...).
_GENERIC_PIP_ERROR = re.compile(r"^error: [a-z-]+$")


class WheelError(UserError):
    """The wheel could not be built or staged; one line (`cluster.bucket: ...`), CLI exit code 2."""

    def __init__(self, problem: str, fix: str = "", key: str = KEY):
        super().__init__(key, problem, fix)


def project_root() -> str:
    """The checkout holding pyproject.toml (the parent of launcher/); WheelError for an installed copy."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isfile(os.path.join(root, "pyproject.toml")):
        raise WheelError("cannot build a wheel from an installed copy",
                         "run from a checkout or pass cluster.wheel_url")
    return root


def _stage_sources(root: str, dest: str) -> None:
    """Copies the packaging files and package directories of `root` into `dest` (no caches, no build/).

    Building from this clean copy keeps stale modules left in the checkout's build/lib out of the wheel,
    leaves the checkout untouched, and lets concurrent builds of one checkout run side by side.
    """
    os.makedirs(dest, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo", "*.egg-info", ".*")
    for name in sorted(os.listdir(root)):
        src = os.path.join(root, name)
        if name.startswith(".") or name.endswith(".egg-info"):
            continue
        if os.path.isfile(src) and _PACKAGING_FILES.match(name):
            shutil.copy2(src, os.path.join(dest, name))
        elif (os.path.isdir(src) and name not in _SKIP_DIRS
              and os.path.isfile(os.path.join(src, "__init__.py"))):
            shutil.copytree(src, os.path.join(dest, name), ignore=ignore)


def _pip_error_line(output: str) -> str:
    """The most telling line of pip's failure output (pip's own first line is a generic banner)."""
    lines = [ln.strip(" \t│╰─>×") for ln in output.splitlines()]
    lines = [ln for ln in lines if ln]
    for ln in lines:
        if "error" in ln.lower() and not _GENERIC_PIP_ERROR.match(ln):
            return ln[:300]
    return lines[0][:300] if lines else "pip exited without output"


def build_wheel(out_dir: str, root: str | None = None) -> str:
    """Builds the project's wheel (pip wheel --no-deps --no-build-isolation) into `out_dir`; returns its path.

    The build runs on a clean copy of the sources with SOURCE_DATE_EPOCH fixed, so identical sources give a
    byte-identical wheel. A wheel of the same name already in `out_dir` is replaced.
    """
    root = os.path.abspath(root or project_root())
    if not os.path.isfile(os.path.join(root, "pyproject.toml")):
        raise WheelError(f"no pyproject.toml in {root}", "run from a checkout or pass cluster.wheel_url")
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="wheel-build-") as tmp:
        src, dist = os.path.join(tmp, "src"), os.path.join(tmp, "dist")
        _stage_sources(root, src)
        env = {**os.environ, "SOURCE_DATE_EPOCH": SOURCE_DATE_EPOCH, "PIP_DISABLE_PIP_VERSION_CHECK": "1",
               "PIP_NO_INPUT": "1", "PYTHONDONTWRITEBYTECODE": "1"}
        cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", dist, src]
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            raise WheelError(f"building the project wheel took over {BUILD_TIMEOUT_S}s") from exc
        wheels = sorted(n for n in os.listdir(dist) if n.endswith(".whl")) if os.path.isdir(dist) else []
        if proc.returncode != 0 or len(wheels) != 1:
            log.debug("pip wheel failed (exit %s):\n%s\n%s", proc.returncode, proc.stdout, proc.stderr)
            why = (_pip_error_line(proc.stderr + "\n" + proc.stdout) if proc.returncode != 0
                   else f"pip produced {len(wheels)} wheels")
            raise WheelError(f"building the project wheel failed: {why}",
                             f"see `python -m pip wheel --no-deps --no-build-isolation {root}`")
        path = os.path.join(os.path.abspath(out_dir), wheels[0])
        shutil.move(os.path.join(dist, wheels[0]), path)
    return path


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_bucket(bucket: str) -> str:
    """`bucket` (gs://bucket[/prefix]) without trailing slashes; WheelError if it is not one."""
    bucket = str(bucket or "").strip()
    if not bucket.startswith(GCS_SCHEME):
        raise WheelError(f"{bucket!r} is not a gs:// URL", "set it to gs://BUCKET[/PREFIX]")
    name, _, prefix = bucket[len(GCS_SCHEME):].partition("/")
    if not _BUCKET_NAME.match(name) or ".." in name:
        raise WheelError(f"{bucket!r} does not name a valid GCS bucket", "set it to gs://BUCKET[/PREFIX]")
    prefix = prefix.strip("/")
    return f"{GCS_SCHEME}{name}/{prefix}" if prefix else f"{GCS_SCHEME}{name}"


def upload_wheel(wheel_path: str, bucket: str) -> str:
    """Uploads to <bucket>/wheels/<sha256[:12]>/<wheel name> unless already there; returns that gs:// URL."""
    bucket = _check_bucket(bucket)
    name = os.path.basename(wheel_path)
    digest = _sha256(wheel_path)[:DIGEST_CHARS]
    store = open_store(f"{bucket}/{WHEELS_DIR}/{digest}")
    url = f"{store.url}/{name}"
    with open(wheel_path, "rb") as f:
        data = f.read()
    t0 = time.perf_counter()
    try:
        if store.exists(name) and store.size(name) == len(data):
            log.info("wheel: %s already staged (checked in %.2fs)", url, time.perf_counter() - t0)
            return url
        store.write_bytes(name, data)
    except Exception as exc:  # noqa: BLE001 - any storage failure becomes one line for the user
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise WheelError(f"uploading the wheel to {url} failed: {type(exc).__name__}: {first}",
                         "check the bucket exists and the credentials may write to it") from exc
    log.info("wheel: uploaded %s (%d bytes) in %.2fs", url, len(data), time.perf_counter() - t0)
    return url


def stage_wheel(bucket: str, cache_dir: str | None = None) -> str:
    """Builds the checkout's wheel (into `cache_dir`, kept, or a temp dir) and uploads it; returns its URL."""
    bucket = _check_bucket(bucket)  # fail before spending a build on a bad bucket
    root = project_root()
    with tempfile.TemporaryDirectory(prefix="wheel-") as tmp:
        t0 = time.perf_counter()
        path = build_wheel(cache_dir or tmp, root)
        log.info("wheel: built %s (%d bytes) in %.2fs", os.path.basename(path), os.path.getsize(path),
                 time.perf_counter() - t0)
        return upload_wheel(path, bucket)
