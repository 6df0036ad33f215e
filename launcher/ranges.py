"""The allowed values of every config key of launcher/schema.py, checked by launcher.validate before anything starts.

RANGES maps each leaf key of the schema to a Range. A Range without a predicate (`ok=None`) checks nothing here;
its text says why: booleans are typed by the schema, some keys are checked by validate.py itself (run dir, data,
catalog, credentials), and some strings are free-form by design. RELATIONS bound one key by another.
tests/test_config_ranges.py fails for a schema key missing from RANGES.
"""
import math
import operator
import os
import re
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, Optional, Tuple
from urllib.parse import urlsplit

from cluster import catalog

PROVIDERS = ("local", "gcp")
CAPACITIES = ("on_demand", "spot", "reserved")
DTYPES = ("float32", "bfloat16")
POSITIONS = ("rotary", "learned")
REMAT = ("none", "full", "dots_saveable")  # trainer/model.py REMAT_POLICIES
ATTENTION = ("auto", "xla", "splash", "blocked")  # trainer/model.py ATTENTION
OPTIMIZERS = ("adamw",)  # trainer/optim.py builds AdamW whatever the name says
TPU_VERSIONS = tuple(sorted({t.version for t in catalog.all_types()}))
SSH_USER = re.compile(r"[a-z_][a-z0-9_-]{0,31}")  # a POSIX (useradd) user name
LABEL_KEY = re.compile(r"[a-z][a-z0-9_-]{0,62}")  # GCP resource labels
LABEL_VALUE = re.compile(r"[a-z0-9_-]{0,63}")
SEED_LIMIT = 2 ** 32  # trainer/state.py makes the PRNG key from jnp.uint32(seed)


@dataclass(frozen=True)
class Range:
    text: str  # the allowed values as the error line names them; without `ok`, why nothing is checked here
    ok: Optional[Callable[[Any], bool]] = None
    fix: str = "set {key}={example}"
    example: Any = None
    problem: str = "must be {text}, got {value}"
    nullable: bool = False

    def error(self, key: str, value: Any) -> Optional[Tuple[str, str]]:
        """(problem, fix) when `value` is outside the range, else None."""
        if self.ok is None or (value is None and self.nullable) or (value is not None and self.ok(value)):
            return None
        example = self.example if isinstance(self.example, str) else show(self.example)
        problem = self.problem.format(text=self.text, value=show(value), raw=value)
        return problem, self.fix.format(key=key, example=example)


def show(value: Any) -> str:
    """A value as an error line shows it: null, true/false, strings quoted."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, str) else str(value)


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def null_or(r: Range) -> Range:
    return replace(r, text=f"null or {r.text}", nullable=True)


def integer(lowest: int, note: str = "", example: Optional[int] = None) -> Range:
    """An integer >= lowest (the wording of validate's original _positive checks)."""
    return Range(f"an integer >= {lowest}{note}", lambda v: _int(v) and v >= lowest,
                 example=max(lowest, 1) if example is None else example)


def integer_in(lo: int, hi: int, example: int) -> Range:
    return Range(f"an integer in {lo}..{hi}", lambda v: _int(v) and lo <= v <= hi, example=example)


def number(op: str, bound: float, example: float) -> Range:
    compare = {">": operator.gt, ">=": operator.ge}[op]
    return Range(f"a number {op} {show(bound)}", lambda v: _num(v) and compare(v, bound), example=example)


def fraction(closed_high: bool, example: float) -> Range:
    high = operator.le if closed_high else operator.lt
    return Range(f"a number in [0, 1{']' if closed_high else ')'}", lambda v: _num(v) and 0 <= v and high(v, 1),
                 example=example)


def choice(values: Tuple[str, ...], noun: str = "") -> Range:
    """The wording of validate's original provider/capacity/dtype/positions checks."""
    return Range(f"one of: {', '.join(values)}", lambda v: v in values, fix="choose one of: " + ", ".join(values),
                 problem=f"unknown {noun + ' ' if noun else ''}'{{raw}}'")


def string(text: str, ok: Callable[[str], bool], example: str) -> Range:
    return Range(text, lambda v: isinstance(v, str) and ok(v), example=example)


def non_empty(example: str) -> Range:
    return string("a non-empty string", lambda v: bool(v.strip()), example)


def unchecked(reason: str) -> Range:
    return Range(reason)


def _url(v: str) -> bool:
    parts = urlsplit(v)
    return parts.scheme in ("http", "https") and bool(parts.netloc) and not any(c.isspace() for c in v)


def _labels(v) -> bool:
    return isinstance(v, dict) and len(v) <= 64 and all(
        isinstance(k, str) and isinstance(x, str) and LABEL_KEY.fullmatch(k) and LABEL_VALUE.fullmatch(x)
        for k, x in v.items())


def _bucket(v: str) -> bool:
    """gs://BUCKET[/PREFIX]; launcher/wheel.py checks the bucket's name against GCS rules before staging."""
    return v.startswith("gs://") and bool(v[len("gs://"):].split("/")[0].strip())


def _compile_cache(v: str) -> bool:
    """trainer/compile_cache.py: auto, off, or a directory each host resolves on its own disk (not a URL)."""
    return v in ("auto", "off") or (v.startswith(("/", "~")) and "://" not in v)


BOOL = unchecked("bool: schema-typed (OmegaConf rejects anything else at composition)")
AT_LEAST_ONE = integer(1)
AXIS = Range("-1 (fill) or an integer >= 1", lambda v: _int(v) and (v == -1 or v >= 1), example=-1)
PORT = integer_in(1, 65535, 8265)
URL = null_or(string("an http(s)://HOST[:PORT] URL", _url, "http://127.0.0.1:8080"))
SECONDS = number(">", 0, 60)
COUNT_OR_NO_LIMIT = Range("-1 (no limit) or an integer >= 0", lambda v: _int(v) and v >= -1, example=-1)
PRICE = null_or(number(">=", 0, 1.0))

RANGES: Dict[str, Range] = {
    "run.name": unchecked("checked by validate.check_run: a plain name (no '/', spaces, '.' or '..')"),
    "run.dir": unchecked("checked by validate.check_run: non-empty, a writable place, no dangling symlink"),

    "model.name": unchecked("free-form: a label set by the model= group (conf/model/)"),
    "model.d_model": AT_LEAST_ONE,
    "model.n_layers": AT_LEAST_ONE,
    "model.n_heads": AT_LEAST_ONE,
    "model.d_ff": AT_LEAST_ONE,
    "model.vocab_size": AT_LEAST_ONE,
    "model.seq_len": AT_LEAST_ONE,
    "model.max_seq_len": AT_LEAST_ONE,
    "model.positions": choice(POSITIONS),
    "model.dtype": choice(DTYPES, "dtype"),
    "model.scan_layers": BOOL,
    "model.remat": choice(REMAT, "remat policy"),
    "model.attention": choice(ATTENTION, "attention"),

    "data.name": unchecked("free-form: set by the data= group; validate.check_data needs data.path unless 'stdlib'"),
    "data.path": unchecked("checked by validate.check_data: a local dir or gs:// prefix holding manifest.json"),
    "data.cache_dir": unchecked("free-form: a local path (null: ~/.cache/tpu-launcher or $TPU_LAUNCHER_CACHE)"),
    "data.max_bytes": AT_LEAST_ONE,
    "data.prefetch": integer(0, " (0: no prefetch thread, batches are read in the step loop)"),

    "optimizer.name": choice(OPTIMIZERS, "optimizer"),
    "optimizer.lr": number(">", 0, 3e-3),
    "optimizer.warmup_steps": integer(0, example=20),
    "optimizer.decay_steps": null_or(integer(1, " (null: trainer.steps)")),
    "optimizer.min_lr_ratio": fraction(True, 0.1),
    "optimizer.b1": fraction(False, 0.9),
    "optimizer.b2": fraction(False, 0.95),
    "optimizer.eps": number(">", 0, 1e-8),
    "optimizer.weight_decay": number(">=", 0, 0.1),
    # optax.clip_by_global_norm(0) zeroes every update: there is no "off" value
    "optimizer.clip_norm": number(">", 0, 1.0),

    "trainer.steps": AT_LEAST_ONE,
    "trainer.batch_size": AT_LEAST_ONE,
    "trainer.seed": integer_in(0, SEED_LIMIT - 1, 0),
    "trainer.eval_every": integer(0, " (0: no evaluation)"),
    "trainer.eval_batches": AT_LEAST_ONE,
    "trainer.log_every": AT_LEAST_ONE,
    "trainer.init_timeout_s": AT_LEAST_ONE,
    "trainer.host_start_timeout_s": AT_LEAST_ONE,
    "trainer.compile_cache": replace(
        string("auto, off or an absolute directory on each host's own disk (/PATH or ~/PATH)", _compile_cache, "auto"),
        fix="set {key}=auto (each host's ~/.cache/tpu-launcher/jax-compile), off, or a local absolute path"),

    "checkpoint.every": AT_LEAST_ONE,
    "checkpoint.keep": AT_LEAST_ONE,
    "checkpoint.dir": unchecked("checked by validate.check_checkpoint_dir: non-empty, a usable directory or gs://"),
    "checkpoint.async_save": BOOL,
    "checkpoint.resume": BOOL,
    "checkpoint.ocdbt": BOOL,
    # that it names a checkpoint with this model's shapes: validate.check_init_from
    "checkpoint.init_from": null_or(non_empty("runs/NAME")),

    "mesh.dcn": AXIS,
    "mesh.data": AXIS,
    "mesh.fsdp": AXIS,
    "mesh.tensor": AXIS,

    "cluster.provider": choice(PROVIDERS, "provider"),
    "cluster.accelerator_type": unchecked("checked by validate.check_cluster against cluster/catalog.py"),
    "cluster.num_slices": AT_LEAST_ONE,
    "cluster.hosts": null_or(integer(1, " (null: from cluster.accelerator_type)")),
    "cluster.devices_per_host": null_or(integer(1, " (null: from cluster.accelerator_type)")),
    "cluster.tpu_version": choice(TPU_VERSIONS, "TPU version"),
    "cluster.cpus_per_host": integer(0),
    "cluster.slice_name": unchecked("free-form: a Ray resource name (null or empty: derived from run.name)"),
    "cluster.project": unchecked("free-form: a GCP project id; required for provider gcp by validate.check_gcp"),
    "cluster.zone": unchecked("free-form: a GCP zone; required for provider gcp by validate.check_gcp"),
    "cluster.runtime_version": unchecked("free-form: a TPU software version (null: the catalog's default)"),
    "cluster.capacity": choice(CAPACITIES, "capacity"),
    "cluster.network": unchecked("free-form: a VPC network name, passed to the Cloud APIs"),
    "cluster.subnetwork": unchecked("free-form: a subnetwork name, passed to the Cloud APIs"),
    "cluster.service_account": unchecked("free-form: a service account email, passed to the Cloud APIs"),
    "cluster.labels": Range("GCP labels: at most 64, keys [a-z][a-z0-9_-]{0,62}, values [a-z0-9_-]{0,63}", _labels,
                            fix="use lowercase keys and values, e.g. +cluster.labels.team=ml"),
    "cluster.bucket": null_or(string("a gs://BUCKET[/PREFIX] URL", _bucket, "gs://BUCKET/PREFIX")),
    "cluster.price_on_demand": PRICE,
    "cluster.price_spot": PRICE,
    "cluster.tpu_api_endpoint": URL,
    "cluster.provision_timeout_s": AT_LEAST_ONE,
    "cluster.delete_on_exit": BOOL,
    "cluster.compute_api_endpoint": URL,
    "cluster.head_machine_type": non_empty("n2-standard-4"),
    "cluster.head_image": non_empty("projects/debian-cloud/global/images/family/debian-12"),
    "cluster.shared_run_dir": unchecked("bool or null: schema-typed (null: true for local, false for gcp)"),
    "cluster.host_run_root": string("an absolute path", os.path.isabs, "/tmp/tpu-launcher/runs"),
    "cluster.head_external_ip": BOOL,
    "cluster.ssh_user": string(f"a POSIX user name ({SSH_USER.pattern})", SSH_USER.fullmatch, "tpu-launcher"),
    "cluster.secret_manager_endpoint": URL,
    "cluster.head_ssh_port": replace(PORT, example=22),

    "ray.address": unchecked("free-form: handed to Ray (HOST:PORT, ray://HOST:PORT or auto)"),
    "ray.auth_token_file": null_or(non_empty("PATH")),  # not required to exist here: the job on the head validates too
    "ray.python": null_or(non_empty("/opt/venv/bin/python")),  # a path on the head: it cannot be checked from here
    "ray.port": replace(PORT, example=6379),
    "ray.dashboard": BOOL,
    "ray.dashboard_port": PORT,

    "launcher.echo": BOOL,
    "launcher.dry_run": BOOL,
    "launcher.preflight": BOOL,
    "launcher.submit": BOOL,
    "launcher.in_job": BOOL,

    "supervisor.max_preemptions": COUNT_OR_NO_LIMIT,
    "supervisor.max_failures": integer(0, example=3),
    "supervisor.backoff_s": number(">=", 0, 2.0),
    "supervisor.backoff_max_s": number(">=", 0, 60.0),
    "supervisor.stop_grace_s": number(">=", 0, 30.0),

    "watchdog.timeout_s": replace(SECONDS, example=600),
    "watchdog.startup_timeout_s": replace(SECONDS, example=1800),
    "watchdog.heartbeat_s": replace(SECONDS, example=1.0),
}

# (key, op, other): key op other must hold, checked after RANGES.
RELATIONS: Tuple[Tuple[str, str, str], ...] = (
    ("watchdog.heartbeat_s", "<", "watchdog.timeout_s"),  # else every host looks hung between two heartbeats
    ("watchdog.heartbeat_s", "<", "watchdog.startup_timeout_s"),
    ("supervisor.backoff_max_s", ">=", "supervisor.backoff_s"),
    ("ray.dashboard_port", "!=", "ray.port"),  # both listen on the head
)
COMPARE = {"<": operator.lt, ">=": operator.ge, "!=": operator.ne}
