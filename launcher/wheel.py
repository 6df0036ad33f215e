"""Build the project's wheel reproducibly and stage it, content-addressed, in the run's bucket for the TPU VMs.

Staging also writes a hash-locked requirements file: every runtime dependency of the wheel (pyproject's
`dependencies` plus its `tpu` extra, `jax[tpu]`), resolved from the package index for the VMs' platform
(manylinux x86_64, this interpreter's Python), one `name==version --hash=sha256:...` line each. The VMs'
startup scripts check the sha256 of both files against the values staged with them (`Staged`) and install
exactly the lock (`pip install --require-hashes --no-deps -r requirements.lock`), then the wheel (`--no-deps`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass

from launcher.errors import UserError, first_line
from trainer.data.storage import GCS_SCHEME, open_store
from trainer.cache import cache_dir
from trainer.runfiles import write_atomic

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

# The lock: resolved for the VMs, not for this machine. TPU VM images (tpu-ubuntu2204-base, v2-alpha-tpuv6e) run
# Ubuntu 22.04 (glibc 2.35), the head VM Debian 12 (2.36): wheels up to manylinux_2_35 run on both. pip expands
# none of the manylinux_2_X tags downwards, so each is named.
LOCK_NAME = "requirements.lock"
LOCK_PLATFORMS = (tuple(f"manylinux_2_{minor}_x86_64" for minor in range(35, 16, -1))
                  + ("manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"))
LOCK_EXTRAS = ("tpu",)  # pyproject extras the VMs install too: `tpu` = jax[tpu] (libtpu)
LOCK_FORMAT = 1  # bump when the lock's content or resolution changes: cached locks are keyed by it
RESOLVE_TIMEOUT_S = 900
MAX_SDIST_ONLY = 8  # dependencies published only as an sdist (antlr4-python3-runtime, ...) resolved per lock
LOCK_LINE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s=;]+) --hash=sha256:([0-9a-f]{64})$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_NO_MATCH = re.compile(r"No matching distribution found for (\S+)")
# What a lock resolution keeps of this machine's pip settings: the index, certificates and network options.
# Config files, find-links and extra indexes (local wheelhouses the VMs do not have) are left out.
_PIP_ENV_KEPT = {"PIP_INDEX_URL", "PIP_CERT", "PIP_CLIENT_CERT", "PIP_TRUSTED_HOST", "PIP_PROXY",
                 "PIP_DEFAULT_TIMEOUT", "PIP_RETRIES", "PIP_TIMEOUT"}


@dataclass(frozen=True)
class Staged:
    """What staging put in the bucket and what the VMs must verify before installing anything: the wheel and its
    hash-locked requirements, each with the sha256 (hex) of its bytes."""

    wheel_url: str
    wheel_sha256: str
    lock_url: str
    lock_sha256: str

    def __post_init__(self):
        for name in ("wheel_sha256", "lock_sha256"):
            if not _SHA256.match(str(getattr(self, name))):
                raise ValueError(f"Staged.{name} must be 64 lowercase hex digits, got {getattr(self, name)!r}")


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


def _same_object(store, name: str, data: bytes) -> tuple[bool, str]:
    """Whether object `name` of `store` holds exactly `data`, and what decided it ("absent", "size", "md5Hash",
    "crc32c" or "bytes").

    GCS's own checksums of the stored bytes decide: md5Hash (absent on composite objects), else crc32c, else the
    object is downloaded and compared. An equal size alone never counts.
    """
    from trainer.data.storage import gcs_client

    key = f"{store.prefix}/{name}" if store.prefix else name
    blob = gcs_client().bucket(store.bucket_name).get_blob(key, timeout=60)
    if blob is None:
        return False, "absent"
    if blob.size is not None and int(blob.size) != len(data):
        return False, "size"
    if blob.md5_hash:
        local = base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()
        return blob.md5_hash == local, "md5Hash"
    if blob.crc32c:
        import google_crc32c

        return blob.crc32c == base64.b64encode(google_crc32c.Checksum(data).digest()).decode(), "crc32c"
    return store.read_bytes(name) == data, "bytes"


def _upload(path: str, bucket: str, what: str) -> tuple[str, str]:
    """Uploads the file to <bucket>/wheels/<sha256[:12]>/<its name> unless that object already holds these very
    bytes (a torn or tampered object under the address is replaced); returns (its gs:// URL, its sha256)."""
    bucket = _check_bucket(bucket)
    name = os.path.basename(path)
    with open(path, "rb") as f:
        data = f.read()
    sha = hashlib.sha256(data).hexdigest()
    store = open_store(f"{bucket}/{WHEELS_DIR}/{sha[:DIGEST_CHARS]}")
    url = f"{store.url}/{name}"
    t0 = time.perf_counter()
    try:
        same, how = _same_object(store, name, data)
        if same:
            log.info("%s: %s already staged (%s matches; checked in %.2fs)", what, url, how, time.perf_counter() - t0)
            return url, sha
        if how != "absent":
            log.warning("%s: %s holds other bytes (%s differs); uploading it again", what, url, how)
        store.write_bytes(name, data)
    except Exception as exc:  # noqa: BLE001 - any storage failure becomes one line for the user
        raise WheelError(f"uploading the {what} to {url} failed: {type(exc).__name__}: {first_line(exc)[:300]}",
                         "check the bucket exists and the credentials may write to it") from exc
    log.info("%s: uploaded %s (%d bytes) in %.2fs", what, url, len(data), time.perf_counter() - t0)
    return url, sha


def upload_wheel(wheel_path: str, bucket: str) -> str:
    """Uploads to <bucket>/wheels/<sha256[:12]>/<wheel name> unless those bytes are already there; its gs:// URL."""
    return _upload(wheel_path, bucket, "wheel")[0]


# --- the lock ------------------------------------------------------------------------------------------------

_LOCK_FIX = ("check that the package index (PyPI, or $PIP_INDEX_URL) is reachable from this machine and has "
             "wheels of the pinned versions for the VMs (manylinux x86_64)")
_NETWORK_ERROR = re.compile(r"NewConnectionError|Max retries exceeded|Temporary failure in name resolution|"
                            r"ConnectTimeout|ReadTimeout|ProxyError|SSLError|Network is unreachable")


def runtime_requirements(root: str | None = None) -> list[str]:
    """What the VMs install with the wheel: pyproject's `dependencies` plus its LOCK_EXTRAS (`tpu`: jax[tpu])."""
    path = os.path.join(root or project_root(), "pyproject.toml")
    try:
        with open(path, "rb") as f:
            project = tomllib.load(f).get("project", {})
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise WheelError(f"cannot read {path}: {exc}") from exc
    reqs = list(project.get("dependencies", []))
    for extra in LOCK_EXTRAS:
        reqs += project.get("optional-dependencies", {}).get(extra, [])
    return list(dict.fromkeys(str(r).strip() for r in reqs if str(r).strip()))


def lock_cache_dir() -> str:
    """$TPU_LAUNCHER_CACHE/locks, else ~/.cache/tpu-launcher/locks."""
    return cache_dir("locks")


def lock_key(requirements, python_version: str, platforms=LOCK_PLATFORMS) -> str:
    """The cache key of a lock: the requirements (in any order), the Python version and the platforms."""
    spec = {"format": LOCK_FORMAT, "requirements": sorted(set(requirements)), "python": python_version,
            "implementation": "cp", "platforms": list(platforms)}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _valid_lock(text: str) -> bool:
    lines = text.splitlines()
    return bool(lines) and all(LOCK_LINE.match(ln) for ln in lines)


def lock_requirements(requirements, python_version: str | None = None, platforms=LOCK_PLATFORMS,
                      cache_dir: str | None = None) -> str:
    """The hash-locked requirements (the lock file's text) of `requirements` for the VMs.

    Resolved once per (requirements, Python version, platforms) and cached in `cache_dir` (lock_cache_dir()):
    a relaunch reads the cached lock, so its transitive versions stay those first resolved until a
    requirement changes. Each line is `name==version --hash=sha256:HEX`, sorted by name.
    """
    python_version = python_version or f"{sys.version_info.major}.{sys.version_info.minor}"
    requirements = list(requirements)
    cache = cache_dir or lock_cache_dir()
    path = os.path.join(cache, f"{lock_key(requirements, python_version, platforms)}.txt")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if _valid_lock(text):
            log.info("lock: %d pinned requirements from the cache (%s)", len(text.splitlines()), path)
            return text
        log.warning("lock: ignoring the malformed cached lock %s", path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("lock: cannot read the cached lock %s: %s", path, exc)
    t0 = time.perf_counter()
    pins = resolve_lock(requirements, python_version, platforms)
    text = "".join(f"{name}=={version} --hash=sha256:{sha}\n" for name, version, sha in pins)
    log.info("lock: resolved %d pinned requirements for Python %s manylinux x86_64 in %.1fs",
             len(pins), python_version, time.perf_counter() - t0)
    try:
        write_atomic(path, text)
    except OSError as exc:  # a read-only cache costs a resolution next time, not this launch
        log.warning("lock: cannot cache the lock in %s: %s", cache, exc)
    return text


def _pip_env() -> dict:
    """The environment of a lock resolution: this machine's index and network settings, none of its pip config
    files, find-links or extra indexes (local wheelhouses and mirrors the VMs do not see)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") or k in _PIP_ENV_KEPT}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1",
               PYTHONDONTWRITEBYTECODE="1")
    return env


def _run_pip(args: list, what: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([sys.executable, "-m", "pip", *args], env=_pip_env(), capture_output=True, text=True,
                              timeout=RESOLVE_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise WheelError(f"{what} took over {RESOLVE_TIMEOUT_S}s", _LOCK_FIX) from exc


def _resolve_error_line(output: str) -> str:
    """The telling line of a failed resolution (pip's first ERROR line often lists versions ignored)."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    for pattern in (_NETWORK_ERROR, re.compile("No matching distribution found|ResolutionImpossible|"
                                               "conflicting dependencies|Could not find a version")):
        for ln in lines:
            if pattern.search(ln):
                return ln.removeprefix("ERROR: ")[:300]
    rest = "\n".join(ln for ln in lines if "Ignored the following" not in ln)
    return _pip_error_line(rest).removeprefix("ERROR: ")


def _wheel_from_sdist(spec: str, work: str, wheelhouse: str, python_version: str) -> tuple[str, str]:
    """A dependency with no wheel on the index: fetch its sdist, build its (pure-Python) wheel into `wheelhouse`
    for the resolution to use; returns (that wheel's file name, the sdist's sha256: what the VMs will fetch)."""
    where = f"for Python {python_version} manylinux x86_64"
    sdists, built = os.path.join(work, "sdist"), os.path.join(work, "built")
    proc = _run_pip(["download", "--no-deps", "--no-binary=:all:", "--quiet", "-d", sdists, spec],
                    f"fetching the sdist of {spec}")
    files = sorted(os.listdir(sdists)) if os.path.isdir(sdists) else []
    if proc.returncode != 0 or len(files) != 1:
        output = proc.stderr + "\n" + proc.stdout
        why = _resolve_error_line(output) if proc.returncode != 0 else f"pip fetched {len(files)} files"
        raise WheelError(f"resolving the VMs' dependencies failed: no wheel of {spec} {where}, and no sdist: "
                         f"{why}", _LOCK_FIX)
    sdist = os.path.join(sdists, files[0])
    proc = _run_pip(["wheel", "--no-deps", "--quiet", "-w", built, sdist], f"building {files[0]}")
    wheels = sorted(n for n in os.listdir(built) if n.endswith(".whl")) if os.path.isdir(built) else []
    if proc.returncode != 0 or len(wheels) != 1 or not wheels[0].endswith("-none-any.whl"):
        raise WheelError(f"resolving the VMs' dependencies failed: {spec} has no wheel {where} on the index and "
                         f"its sdist does not build a pure-Python one", "pin a version of it that has such wheels")
    shutil.move(os.path.join(built, wheels[0]), os.path.join(wheelhouse, wheels[0]))
    return wheels[0], _sha256(sdist)


def _report_sha256(info: dict) -> str:
    archive = info.get("archive_info") or {}
    sha = (archive.get("hashes") or {}).get("sha256", "")
    if not sha and str(archive.get("hash", "")).startswith("sha256="):  # pip < 23: only "hash"
        sha = archive["hash"].split("=", 1)[1]
    return sha


def resolve_lock(requirements, python_version: str, platforms=LOCK_PLATFORMS) -> list[tuple[str, str, str]]:
    """(name, version, sha256) of every distribution that installing `requirements` puts on a VM, sorted by name.

    pip resolves from the index for the VMs (`--platform ... --python-version ... --implementation cp
    --only-binary=:all:`, a dry run reading PEP 658 metadata: no full downloads) and reports the file each
    distribution comes from with its sha256. A dependency published only as an sdist (a pure-Python one) is
    built here for the resolution, and the sdist's own hash goes into the lock (what pip on the VM fetches).
    A failure is one WheelError line.
    """
    from urllib.parse import unquote

    with tempfile.TemporaryDirectory(prefix="lock-") as tmp:
        reqs_file, report = os.path.join(tmp, "requirements.in"), os.path.join(tmp, "report.json")
        with open(reqs_file, "w", encoding="utf-8") as f:
            f.write("".join(f"{r}\n" for r in requirements))
        wheelhouse = os.path.join(tmp, "sdist-wheels")
        os.makedirs(wheelhouse)
        sdist_sha: dict[str, str] = {}  # wheel built here from an sdist -> that sdist's sha256
        while True:
            args = ["install", "--dry-run", "--ignore-installed", "--quiet", "--report", report,
                    "--target", os.path.join(tmp, "target"), "--only-binary=:all:",
                    "--python-version", python_version, "--implementation", "cp",
                    *(f"--platform={p}" for p in platforms), "-r", reqs_file]
            if sdist_sha:
                args += ["--find-links", wheelhouse]
            proc = _run_pip(args, "resolving the VMs' dependencies")
            if proc.returncode == 0:
                break
            output = proc.stderr + "\n" + proc.stdout
            missing = _NO_MATCH.search(output)
            if missing is None or _NETWORK_ERROR.search(output) or len(sdist_sha) >= MAX_SDIST_ONLY:
                log.debug("pip resolution failed (exit %s):\n%s", proc.returncode, output)
                raise WheelError(f"resolving the VMs' dependencies (Python {python_version}, manylinux x86_64) "
                                 f"failed: {_resolve_error_line(output)}", _LOCK_FIX)
            name, sha = _wheel_from_sdist(missing.group(1), os.path.join(tmp, f"sdist-{len(sdist_sha)}"),
                                          wheelhouse, python_version)
            if name in sdist_sha:  # built, and still no match: pip rejects it for another reason
                raise WheelError(f"resolving the VMs' dependencies failed: {_resolve_error_line(output)}", _LOCK_FIX)
            sdist_sha[name] = sha
        with open(report, encoding="utf-8") as f:
            installs = json.load(f).get("install", [])
    pins: dict[str, tuple[str, str, str]] = {}
    for item in installs:
        meta, info = item.get("metadata", {}), item.get("download_info", {})
        name, version, url = meta.get("name", ""), meta.get("version", ""), str(info.get("url", ""))
        sha = _report_sha256(info)
        if url.startswith("file:"):
            sha = sdist_sha.get(unquote(url.rsplit("/", 1)[-1]), "")
        if not (name and version and _SHA256.match(sha or "")):
            raise WheelError(f"resolving the VMs' dependencies failed: pip reported no sha256 for {name or url} "
                             f"{version}", _LOCK_FIX)
        pins[re.sub(r"[-_.]+", "-", name).lower()] = (name, version, sha)
    if not pins:
        raise WheelError("resolving the VMs' dependencies failed: pip reported nothing to install", _LOCK_FIX)
    return [pins[k] for k in sorted(pins)]


def stage_wheel(bucket: str, cache_dir: str | None = None) -> Staged:
    """Builds the checkout's wheel (into `cache_dir`, kept, or a temp dir), locks its runtime dependencies for the
    VMs (lock_requirements) and uploads both, content-addressed; returns what the VMs must fetch and verify."""
    bucket = _check_bucket(bucket)  # fail before spending a build on a bad bucket
    root = project_root()
    lock_text = lock_requirements(runtime_requirements(root))
    with tempfile.TemporaryDirectory(prefix="wheel-") as tmp:
        t0 = time.perf_counter()
        path = build_wheel(cache_dir or tmp, root)
        log.info("wheel: built %s (%d bytes) in %.2fs", os.path.basename(path), os.path.getsize(path),
                 time.perf_counter() - t0)
        wheel_url, wheel_sha = _upload(path, bucket, "wheel")
        lock_path = os.path.join(tmp, LOCK_NAME)
        with open(lock_path, "wb") as f:
            f.write(lock_text.encode("utf-8"))
        lock_url, lock_sha = _upload(lock_path, bucket, "lock")
    return Staged(wheel_url, wheel_sha, lock_url, lock_sha)


# The launching terminal stages once; the supervisor's Ray job on the head (an installed copy, no checkout to build
# from) gets what it staged through this variable of the job's env, so the VMs install exactly what was planned.
STAGED_ENV = "TPU_LAUNCHER_STAGED"


def staged_for_run(bucket: str) -> tuple[Staged, bool]:
    """(what this run's VMs install, whether it was staged by an earlier step of this launch): the staging in
    TPU_LAUNCHER_STAGED if set, else a fresh stage_wheel from this checkout (then kept there for the job)."""
    raw = os.environ.get(STAGED_ENV)
    if raw:
        try:
            return Staged(**json.loads(raw)), True
        except (TypeError, ValueError) as exc:
            raise WheelError(f"{STAGED_ENV} does not describe a staged wheel ({exc})",
                             "unset it; it is set by the launcher for its job on the head") from None
    staged = stage_wheel(bucket)
    os.environ[STAGED_ENV] = staged_env(staged)[STAGED_ENV]
    return staged, False


def staged_env(staged: Staged) -> dict:
    """The env entry that hands `staged` to the supervisor's job (hashes and URLs: nothing secret)."""
    return {STAGED_ENV: json.dumps({"wheel_url": staged.wheel_url, "wheel_sha256": staged.wheel_sha256,
                                    "lock_url": staged.lock_url, "lock_sha256": staged.lock_sha256})}
