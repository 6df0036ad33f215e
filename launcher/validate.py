"""Check a composed config before anything is provisioned or written; each problem is one UserError.

The allowed values of every key are in launcher/ranges.py (check_ranges, right after check_run). Also resolves
what the rest of the launch needs: the absolute run dir, the data location (preparing the embedded corpus on
first use), the checkpoint step a warm start (checkpoint.init_from) begins from, the mesh sizes and the slice to
run on.
"""
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

import trainer
from cluster import catalog
from cluster.cloud import cloud_slice_name
from cluster.slice import SliceSpec, catalog_slice, local_slice, slice_name_for
from launcher.errors import UserError
from launcher.ranges import COMPARE, RANGES, RELATIONS, show
from trainer.data import DataError, ensure_default_corpus, read_manifest
from trainer.mesh_shape import resolve_mesh_shape

_ABSENT = object()
INIT_FROM_TIMEOUT_S = 300  # reading a checkpoint's metadata: seconds locally, longer from gs:// on a slow link


@dataclass
class Plan:
    devices: int
    mesh: Dict[str, int]
    slice: SliceSpec
    manifest: dict
    tpu: Optional[object] = None  # cluster.catalog.TpuType when cluster.accelerator_type is set
    num_slices: int = 1
    slices: List[SliceSpec] = field(default_factory=list)  # one per slice; JAX process = slice x hosts + worker


def _positive(cfg: DictConfig, *keys: str):
    for key in keys:
        value = _get(cfg, key)
        if value is None or value < 1:
            raise UserError(key, f"must be an integer >= 1, got {value}", f"set {key}=1")


def _get(cfg: DictConfig, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def check_run(cfg: DictConfig) -> None:
    name = cfg.run.name
    if not name or "/" in name or name in (".", "..") or any(c.isspace() for c in name):
        raise UserError("run.name", f"'{name}' is not a plain name (no '/', spaces, '.' or '..')",
                        "use letters, digits, '-' or '_', e.g. run.name=demo-1")
    if not str(cfg.run.dir).strip():
        raise UserError("run.dir", "is empty", "leave the default runs/${run.name} or set run.dir=PATH")
    if os.path.islink(cfg.run.dir) and not os.path.exists(cfg.run.dir):
        raise UserError("run.dir", f"{cfg.run.dir} is a dangling symlink", "remove it or choose another run.dir")
    parent = os.path.dirname(os.path.abspath(cfg.run.dir)) or "."
    probe = os.path.abspath(cfg.run.dir) if os.path.exists(cfg.run.dir) else parent
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        raise UserError("run.dir", f"{probe} is not a writable directory", "choose a writable run.dir")


def check_ranges(cfg: DictConfig) -> None:
    """Every key against its range in launcher/ranges.py (numbers, choices, names, URLs), then the RELATIONS
    between keys; needs nothing but the config, so a bad value never costs preparing the corpus."""
    for key, allowed in RANGES.items():
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is _ABSENT:
            continue
        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value)
        error = allowed.error(key, value)
        if error:
            raise UserError(key, *error)
    for key, op, other in RELATIONS:
        value, bound = OmegaConf.select(cfg, key), OmegaConf.select(cfg, other)
        if value is not None and bound is not None and not COMPARE[op](value, bound):
            raise UserError(key, f"must be {op} {other} = {show(bound)}, got {show(value)}",
                            f"change {key} or {other}")


def check_cluster(cfg: DictConfig):
    """The slice to run on (from the catalog when cluster.accelerator_type is set) and the catalog entry."""
    c = cfg.cluster  # provider, capacity, num_slices and cpus_per_host: check_ranges
    name = c.slice_name or (cloud_slice_name(cfg.run.name) if c.provider == "gcp" else slice_name_for(cfg.run.name))
    if not c.accelerator_type:
        if c.provider != "local":
            raise UserError("cluster.accelerator_type", f"is required for provider {c.provider}",
                            "e.g. +cluster=v4-32 or cluster.accelerator_type=v4-32")
        _positive(cfg, "cluster.hosts", "cluster.devices_per_host")
        return local_slice(cfg.run.name, int(c.hosts), int(c.devices_per_host), str(c.tpu_version),
                           None, name), None
    try:
        tpu = catalog.lookup(str(c.accelerator_type))
    except catalog.CatalogError as e:
        raise UserError("cluster.accelerator_type", str(e), "pick a type from cluster/catalog.py, e.g. v4-32") from None
    for key, given, derived in (("cluster.hosts", c.hosts, tpu.hosts),
                                ("cluster.devices_per_host", c.devices_per_host, tpu.devices_per_host)):
        if given is not None and int(given) != derived:
            raise UserError(key, f"{tpu.name} has {derived}, not {given}", f"leave {key} unset (null) for {tpu.name}")
    return catalog_slice(name, tpu), tpu


def check_gcp(cfg: DictConfig) -> None:
    """Project, zone and credentials for the Cloud TPU API, before anything is created."""
    c = cfg.cluster
    if cfg.launcher.dry_run:
        return  # a dry run creates nothing: no project, head or credentials needed
    for key in ("project", "zone"):
        if not c[key]:
            raise UserError(f"cluster.{key}", "is required for provider gcp", f"pass cluster.{key}=...")
    if not cfg.ray.address and not c.bucket:
        raise UserError("cluster.bucket", "a cloud run without ray.address creates a Ray head VM, which installs "
                        "the project wheel from the run's bucket", "pass cluster.bucket=gs://BUCKET/PREFIX "
                        "(or ray.address=IP:PORT of a Ray head in the VPC)")
    if c.tpu_api_endpoint:
        return  # a local Cloud TPU API server (tests): no credentials
    if not c.bucket:
        raise UserError("cluster.bucket", "a cloud run needs a bucket for the project wheel its TPU VMs install",
                        "pass cluster.bucket=gs://BUCKET/PREFIX")
    try:
        import google.auth

        google.auth.default()
    except Exception as e:  # noqa: BLE001 - any failure means no usable credentials
        raise UserError("credentials", f"no Google credentials found ({type(e).__name__})",
                        "run `gcloud auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS") from None


def check_mesh(cfg: DictConfig, devices: int) -> Dict[str, int]:
    try:
        return resolve_mesh_shape({"dcn": cfg.mesh.dcn, "data": cfg.mesh.data, "fsdp": cfg.mesh.fsdp,
                                   "tensor": cfg.mesh.tensor}, devices)
    except ValueError as e:
        key, _, rest = str(e).partition(": ")
        raise UserError(key, rest, f"the pod has cluster.hosts x cluster.devices_per_host = {devices} devices; "
                                   f"e.g. mesh.data=-1") from None


def check_model(cfg: DictConfig, mesh: Dict[str, int]) -> None:
    m = cfg.model  # sizes >= 1, dtype and positions: check_ranges
    if m.seq_len > m.max_seq_len:
        raise UserError("model.seq_len", f"{m.seq_len} is above the model's maximum model.max_seq_len="
                        f"{m.max_seq_len}", f"lower model.seq_len to <= {m.max_seq_len} or raise model.max_seq_len")
    if m.d_model % m.n_heads:
        raise UserError("model.n_heads", f"d_model={m.d_model} is not divisible by n_heads={m.n_heads}",
                        "pick n_heads dividing d_model")
    if m.positions == "rotary" and (m.d_model // m.n_heads) % 2:
        raise UserError("model.n_heads", "rotary positions need an even head dimension (d_model / n_heads)",
                        "change n_heads or use model.positions=learned")
    if m.attention == "splash":
        if cfg.cluster.provider == "local":
            raise UserError("model.attention", "splash is a TPU kernel and a local pod runs on CPU",
                            "use model.attention=auto (splash on TPU, XLA's attention elsewhere) or xla")
        if m.seq_len % 128:
            raise UserError("model.attention", f"the splash kernel needs model.seq_len a multiple of 128, got "
                            f"{m.seq_len}", "use model.attention=auto or xla, or such a seq_len")
    t, f = mesh["tensor"], mesh["fsdp"]
    for key, value, axis, size in (("model.n_heads", m.n_heads, "tensor", t), ("model.d_ff", m.d_ff, "tensor", t),
                                   ("model.vocab_size", m.vocab_size, "tensor", t),
                                   ("model.d_model", m.d_model, "fsdp", f)):
        if value % size:
            raise UserError(key, f"{value} is not divisible by mesh.{axis}={size}",
                            f"use a multiple of {size} or a smaller mesh.{axis}")


def check_trainer(cfg: DictConfig, mesh: Dict[str, int]) -> None:
    shards = mesh.get("dcn", 1) * mesh["data"] * mesh["fsdp"]
    axes = "dcn x data x fsdp" if "dcn" in mesh else "data x fsdp"
    if cfg.trainer.batch_size % shards:
        raise UserError("trainer.batch_size", f"{cfg.trainer.batch_size} is not divisible by mesh {axes} = "
                        f"{shards}", f"use a multiple of {shards}")


def check_data(cfg: DictConfig) -> dict:
    d = cfg.data
    if d.path is None:
        if d.name != "stdlib":
            raise UserError("data.path", f"is required for data={d.name}",
                            "pass data.path=DIR or gs://bucket/prefix (made by python -m trainer.data prepare)")
        with open_dict(cfg):
            cfg.data.path = ensure_default_corpus(d.cache_dir, max_bytes=int(d.max_bytes))
    elif not str(d.path).startswith("gs://"):
        with open_dict(cfg):
            cfg.data.path = os.path.abspath(os.path.expanduser(d.path))
    try:
        manifest = read_manifest(cfg.data.path)
    except DataError as e:
        raise UserError("data.path", str(e), "prepare shards with: python -m trainer.data prepare "
                                             "--input CORPUS --output DIR") from None
    record_len = int(manifest["record_len"])
    if cfg.model.seq_len > record_len - 1:
        raise UserError("model.seq_len", f"{cfg.model.seq_len} is longer than the data's records allow "
                        f"({record_len - 1} tokens)", f"use model.seq_len <= {record_len - 1} or prepare the data "
                                                       f"with --record-len {cfg.model.seq_len + 1}")
    if cfg.model.vocab_size < int(manifest["vocab_size"]):
        raise UserError("model.vocab_size", f"{cfg.model.vocab_size} is smaller than the tokenizer's vocabulary "
                        f"({manifest['vocab_size']})", f"use model.vocab_size >= {manifest['vocab_size']}")
    for split in ("train", "val", "test"):
        records = int(manifest["splits"].get(split, {}).get("records", 0))
        if records < cfg.trainer.batch_size:
            raise UserError("trainer.batch_size", f"the {split} split of {cfg.data.path} has {records} records, "
                            f"fewer than one global batch ({cfg.trainer.batch_size})",
                            "lower trainer.batch_size or prepare more data")
    return manifest


def check_checkpoint_dir(cfg: DictConfig) -> None:
    path = str(cfg.checkpoint.dir)
    if not path.strip() or path.rstrip("/") == "gs:/":
        raise UserError("checkpoint.dir", "is empty", "leave the default ${run.dir}/checkpoints or set a path")
    if path.startswith("gs://"):
        return
    path = os.path.abspath(os.path.expanduser(path))
    with open_dict(cfg):
        cfg.checkpoint.dir = path
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise UserError("checkpoint.dir", f"{path} exists and is not a directory",
                            "point checkpoint.dir at a directory")
        if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
            raise UserError("checkpoint.dir", f"{path} is not readable and writable by this user",
                            "fix its permissions or choose another checkpoint.dir")


def check_init_from(cfg: DictConfig) -> None:
    """checkpoint.init_from names a finished checkpoint whose parameters have this model's shapes (trainer/warmstart.py,
    run as a subprocess: orbax reads array metadata through JAX, which the launcher does not import); the path is
    then pinned to that step's directory, so every host and attempt warm-starts from the same step. A run with
    checkpoints of its own resumes from them and ignores init_from (the trainer says so), so nothing is checked."""
    path = cfg.checkpoint.init_from
    if path is None:
        return
    if not path.startswith("gs://"):
        path = os.path.abspath(os.path.expanduser(path))
        if cfg.cluster.provider != "local":
            raise UserError("checkpoint.init_from", f"{path} is on this machine, which the TPU VMs cannot read",
                            "copy the checkpoint to a bucket and pass its gs:// path")
    argv = [sys.executable, "-m", "trainer.warmstart", "--init-from", path, "--seq-len", str(cfg.model.seq_len),
            "--model", json.dumps(OmegaConf.to_container(cfg.model, resolve=True))]
    if cfg.checkpoint.resume:
        argv += ["--own-checkpoints", str(cfg.checkpoint.dir)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(trainer.__file__)))
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL,
                              timeout=INIT_FROM_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise UserError("checkpoint.init_from", f"reading the checkpoint at {path} took over {INIT_FROM_TIMEOUT_S}s",
                        "check that its storage is reachable from here") from None
    try:
        found = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):  # it crashed before its answer: its last error line says why
        last = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        raise UserError("checkpoint.init_from", f"could not read the checkpoint at {path}: {last[:300]}",
                        "check the path and its permissions (and credentials for gs://)") from None
    if "problem" in found:
        raise UserError("checkpoint.init_from", found["problem"], found["fix"])
    if "path" in found:
        with open_dict(cfg):
            cfg.checkpoint.init_from = found["path"]


def validate(cfg: DictConfig) -> Plan:
    """Checks in the order a user would fix them; mutates cfg only to make paths absolute/resolved."""
    check_run(cfg)
    check_ranges(cfg)
    with open_dict(cfg):
        cfg.run.dir = os.path.abspath(os.path.expanduser(cfg.run.dir))
    spec, tpu = check_cluster(cfg)
    num_slices = int(cfg.cluster.num_slices)
    if cfg.mesh.dcn not in (1, num_slices):
        raise UserError("mesh.dcn", f"is {cfg.mesh.dcn} but cluster.num_slices={num_slices}",
                        "leave mesh.dcn unset: it follows cluster.num_slices")
    with open_dict(cfg):
        cfg.mesh.dcn = num_slices
    slices = [spec] if num_slices == 1 else [replace(spec, name=f"{spec.name}-{i}") for i in range(num_slices)]
    devices = spec.hosts * spec.devices_per_host * num_slices
    mesh = check_mesh(cfg, devices)
    check_model(cfg, mesh)
    check_trainer(cfg, mesh)
    check_checkpoint_dir(cfg)
    check_init_from(cfg)
    manifest = check_data(cfg)
    if cfg.cluster.provider == "gcp":
        check_gcp(cfg)  # last: project, head, bucket and credentials are the environment, not the job
    return Plan(devices=devices, mesh=mesh, slice=spec, manifest=manifest, tpu=tpu, num_slices=num_slices,
                slices=slices)
