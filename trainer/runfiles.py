"""The run-directory contract: file names and layout, JSONL append/read, atomic write, exit codes, phase names.

The trainer writes the run directory through this module; the launcher and every `tpu-launch` command read it
through this module. It is the only thing the two rooms share, and it imports nothing heavy (no jax, no ray), so
a command such as `tpu-launch status` starts in a fraction of a second.

Layout of `${run.dir}`:
    config.yaml              the composed config of the latest launch
    summary.json             the outcome of the latest launch (written by the launcher at its end)
    result.json              host 0's final figures (result.previous.json: the launch before)
    metrics.jsonl            one record per logged step and per eval (host 0)
    events.jsonl             timing points of every host and the launcher
    goodput.jsonl            the goodput ledger (host 0 and the launcher)
    hosts/host-<i>.json      heartbeat of host i: pid, step, phase, exit
    logs/host-<i>.log        stdout and stderr of host i
    checkpoints/<step>/      orbax checkpoints
    pod.json                 the local pod's processes, while one is up
    lock                     held (fcntl) by the live launcher
    plan.json                the dry run's plan
    tb/                      TensorBoard event files (host 0)
    report.png               the run's report
    eval/<step>-<split>.json `tpu-launch eval`'s result for one checkpoint step and split
    auth/                    the run's Ray token and SSH keys (0700)
    mirror.json              a cloud run's mirror index as last pulled from its bucket (launcher/mirror.py)

A cloud run's supervisor mirrors the files `mirrored_names` lists (the small files: no checkpoints, no auth/, no
lock or pod record, not config.yaml) to its bucket; the laptop pulls back only names `is_mirrored` accepts, each
only inside the run directory (`inside`).
"""
import json
import os
import re
import threading
from typing import Any, Iterator, List, Optional, Union

CONFIG = "config.yaml"
SUMMARY = "summary.json"
RESULT = "result.json"
RESULT_PREVIOUS = "result.previous.json"
METRICS = "metrics.jsonl"
EVENTS = "events.jsonl"
GOODPUT = "goodput.jsonl"
HOSTS = "hosts"
LOGS = "logs"
CHECKPOINTS = "checkpoints"
POD = "pod.json"
LOCK = "lock"
PLAN = "plan.json"
TB = "tb"
REPORT = "report.png"
AUTH = "auth"
EVAL = "eval"
MIRROR = "mirror.json"

# Names of the TensorBoard event files in tb/ (tensorboardX's and our writers': trainer/tensorboard.py).
EVENT_FILE = re.compile(r"events\.out\.tfevents\.[A-Za-z0-9._-]{1,200}")
# What a cloud run mirrors to its bucket: these files, every host's log and heartbeat, and host 0's event files.
MIRRORED = (SUMMARY, RESULT, RESULT_PREVIOUS, METRICS, EVENTS, GOODPUT, REPORT)
_MIRRORED_IN = {LOGS: re.compile(r"host-[0-9]{1,6}\.log"), HOSTS: re.compile(r"host-[0-9]{1,6}\.json"),
                TB: EVENT_FILE}

# Exit codes of the trainer and of the launcher's command.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USER_ERROR = 2  # bad config, data, checkpoint or credentials: restarting will not help
EXIT_RESTARTABLE = 42  # preempted (checkpoint saved) or storage down past its retries: restart the slice

# Heartbeat phases (hosts/host-<i>.json "phase"). Saves and evals carry their step: save-<step>, eval-<split>-<step>.
PHASE_INIT = "init"
PHASE_RESTORE = "restore"
PHASE_COMPILE = "compile"
PHASE_TRAIN = "train"
PHASE_SAVE_WAIT = "save-wait"
PHASE_EXITED = "exited"
STARTUP_PHASES = frozenset({PHASE_INIT, PHASE_RESTORE, PHASE_COMPILE})

# Exit reasons a host records with its exit code (heartbeat "exit": {"code", "reason"}).
REASON_DONE = "done"
REASON_PREEMPTION = "preemption"
REASON_USER_ERROR = "user_error"
REASON_STORAGE = "storage"
REASON_EXCEPTION = "exception"
REASON_INIT_FAILED = "init_failed"  # jax.distributed could not be joined


def save_phase(step: int) -> str:
    return f"save-{int(step)}"


def eval_phase(split: str, step: int) -> str:
    return f"eval-{split}-{int(step)}"


def is_save_phase(phase: Optional[str]) -> bool:
    return bool(phase) and str(phase).startswith("save-")


def path(run_dir: str, *parts: str) -> str:
    return os.path.join(run_dir, *parts)


def heartbeat_file(run_dir: str, host: int) -> str:
    return os.path.join(run_dir, HOSTS, f"host-{int(host)}.json")


def host_log(run_dir: str, host: int) -> str:
    return os.path.join(run_dir, LOGS, f"host-{int(host)}.log")


def host_ids(run_dir: str, kind: str = LOGS) -> List[int]:
    """The host numbers that have a file in logs/ (or hosts/), in order."""
    prefix, suffix = "host-", ".log" if kind == LOGS else ".json"
    found = []
    try:
        names = os.listdir(os.path.join(run_dir, kind))
    except OSError:
        return []
    for name in names:
        if name.startswith(prefix) and name.endswith(suffix) and name[len(prefix):-len(suffix)].isdigit():
            found.append(int(name[len(prefix):-len(suffix)]))
    return sorted(found)


def inside(run_dir: str, name: str) -> Optional[str]:
    """run_dir/name, if `name` is a relative path that stays inside run_dir; else None."""
    if not isinstance(name, str) or not name or "\0" in name or "\\" in name or os.path.isabs(name):
        return None
    if any(part in ("", ".", "..") for part in name.split("/")):
        return None
    root = os.path.abspath(run_dir)
    target = os.path.abspath(os.path.join(root, name))
    return target if os.path.commonpath([root, target]) == root and target != root else None


def is_mirrored(name: str) -> bool:
    """Whether `name` (relative to the run directory, '/'-separated) is one of the files a cloud run mirrors."""
    if not isinstance(name, str):
        return False
    if name in MIRRORED:
        return True
    folder, _, base = name.partition("/")
    pattern = _MIRRORED_IN.get(folder)
    return pattern is not None and bool(pattern.fullmatch(base))


def mirrored_names(run_dir: str) -> List[str]:
    """The mirrored files (`is_mirrored`) the run directory holds now, as '/'-separated relative names."""
    names = [n for n in MIRRORED if os.path.isfile(os.path.join(run_dir, n))]
    for folder in _MIRRORED_IN:
        try:
            found = sorted(os.listdir(os.path.join(run_dir, folder)))
        except OSError:
            continue
        names += [f"{folder}/{n}" for n in found
                  if is_mirrored(f"{folder}/{n}") and os.path.isfile(os.path.join(run_dir, folder, n))]
    return names


def _default(x: Any):
    try:
        return float(x)
    except (TypeError, ValueError):
        return str(x)


def append_jsonl(file: str, record: dict) -> None:
    """One O_APPEND write per record, so several processes may append to the same file safely."""
    line = (json.dumps(record, sort_keys=True, default=_default) + "\n").encode()
    os.makedirs(os.path.dirname(file) or ".", exist_ok=True)
    fd = os.open(file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def iter_jsonl(file: str) -> Iterator[dict]:
    """The records of a JSONL file, in order. A torn last line (a writer died mid-write), an undecodable line or a
    line that is not an object is skipped; a missing file has no records."""
    try:
        with open(file, "rb") as f:
            data = f.read()
    except (FileNotFoundError, NotADirectoryError):
        return
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            yield record


def read_jsonl(file: str) -> List[dict]:
    return list(iter_jsonl(file))


def write_atomic(file: str, data: Union[str, bytes], mode: int = 0o644) -> None:
    """Write a whole file so readers see the old content or the new, never a part: a temp file next to it (named by
    process and thread, so concurrent writers, threads of one process included, do not collide), then os.replace."""
    os.makedirs(os.path.dirname(file) or ".", exist_ok=True)
    tmp = f"{file}.{os.getpid()}.{threading.get_ident()}.tmp"
    raw = data.encode() if isinstance(data, str) else data
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        os.replace(tmp, file)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass  # never created, or already renamed
        raise


def write_json(file: str, obj: Any) -> None:
    """A whole JSON file, atomically. Strict: a value JSON cannot hold raises before anything is written."""
    write_atomic(file, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_config(run_dir: str) -> dict:
    """The run's config.yaml as a plain dict ({} if it is missing or unreadable); PyYAML, no OmegaConf or Hydra."""
    import yaml

    try:
        with open(path(run_dir, CONFIG)) as f:
            cfg = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def read_json(file: str) -> Optional[Any]:
    """A JSON file's content, or None if it is missing, half-written or unreadable."""
    try:
        with open(file) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
