"""Structured config schema, registered in Hydra's ConfigStore so typos and wrong types fail at composition."""
from dataclasses import dataclass, field
from typing import Dict, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class RunConfig:
    name: str = "default"
    dir: str = "runs/${run.name}"


@dataclass
class ModelConfig:
    name: str = "tiny"
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 256
    vocab_size: int = 384  # >= tokenizer vocab; padded to a multiple of 128 so it shards evenly
    seq_len: int = 64
    max_seq_len: int = 256
    positions: str = "rotary"  # rotary | learned
    dtype: str = "float32"  # compute dtype: float32 | bfloat16 (parameters stay float32)
    scan_layers: bool = False  # one nn.scan over the blocks: compile time flat in depth (params stacked per layer)
    remat: str = "none"  # recompute block activations in the backward pass: none | full | dots_saveable
    # training attention: auto (the Pallas splash kernel on a TPU mesh when the shapes allow; off TPU blocked where
    # seq_len splits into blocks of 64+; else xla) | xla (jax.nn.dot_product_attention) | splash (the kernel, or
    # an error where it cannot run) | blocked (causal query blocks that skip the keys they cannot see)
    attention: str = "auto"


@dataclass
class DataConfig:
    name: str = "stdlib"
    path: Optional[str] = None  # local dir or gs://bucket/prefix with manifest.json; null = embedded corpus
    cache_dir: Optional[str] = None  # where the embedded corpus is prepared (default ~/.cache/tpu-launcher)
    max_bytes: int = 6_000_000  # cap on raw source bytes for the embedded corpus
    prefetch: int = 2


@dataclass
class OptimizerConfig:
    name: str = "adamw"
    lr: float = 3e-3
    warmup_steps: int = 20
    decay_steps: Optional[int] = None  # cosine decay length; null = trainer.steps
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0


@dataclass
class TrainerConfig:
    steps: int = 300
    batch_size: int = 16  # global, across all hosts
    seed: int = 0
    eval_every: int = 100
    eval_batches: int = 4
    log_every: int = 10
    init_timeout_s: int = 300  # jax.distributed.initialize timeout
    host_start_timeout_s: int = 120  # waiting for Ray to place one trainer per host
    # persistent JAX compilation cache on each host's own disk: auto ($TPU_LAUNCHER_CACHE or ~/.cache/tpu-launcher,
    # /jax-compile) | off | an absolute directory (trainer/compile_cache.py)
    compile_cache: str = "auto"


@dataclass
class CheckpointConfig:
    every: int = 100
    keep: int = 3
    dir: str = "${run.dir}/checkpoints"
    async_save: bool = True
    resume: bool = True
    ocdbt: bool = True  # orbax OCDBT format (false: one tensorstore per array; needed by the GCS emulator)
    # warm start: a run dir, checkpoints dir or step dir (local or gs://) whose parameters a run with no
    # checkpoint of its own starts from (fresh optimizer, step 0); null: random init
    init_from: Optional[str] = None


@dataclass
class MeshConfig:
    dcn: int = 1  # slices (set from cluster.num_slices)
    data: int = -1
    fsdp: int = 1
    tensor: int = 1


@dataclass
class ClusterConfig:
    provider: str = "local"  # local | gcp
    accelerator_type: Optional[str] = None  # e.g. v4-32 (see cluster/catalog.py); null for the plain local pod
    num_slices: int = 1  # > 1: multislice, a `dcn` data-parallel mesh axis across slices
    hosts: Optional[int] = 2  # per slice; derived from accelerator_type when null
    devices_per_host: Optional[int] = 2  # derived from accelerator_type when null
    tpu_version: str = "v4"
    cpus_per_host: int = 1
    slice_name: Optional[str] = None  # null = derived from run.name
    project: Optional[str] = None
    zone: Optional[str] = None
    runtime_version: Optional[str] = None  # null = the catalog's default for the TPU version
    capacity: str = "on_demand"  # on_demand | spot | reserved
    network: Optional[str] = None
    subnetwork: Optional[str] = None
    service_account: Optional[str] = None
    labels: Dict[str, str] = field(default_factory=dict)
    bucket: Optional[str] = None  # gs://bucket[/prefix] for run storage on cloud runs
    price_on_demand: Optional[float] = None  # USD per chip-hour; null = catalog list price
    price_spot: Optional[float] = None
    tpu_api_endpoint: Optional[str] = None  # Cloud TPU API override (http://host:port: a test server, no credentials)
    provision_timeout_s: int = 3600
    delete_on_exit: bool = True  # delete the TPU resources when the launch ends
    compute_api_endpoint: Optional[str] = None  # Compute Engine API override (tests), for the head VM
    head_machine_type: str = "n2-standard-4"  # the Ray head VM created when ray.address is null
    head_image: str = "projects/debian-cloud/global/images/family/debian-12"  # its Python must match the TPU VMs'
    shared_run_dir: Optional[bool] = None  # hosts see run.dir (null: true for local, false for gcp: synced)
    host_run_root: str = "/tmp/tpu-launcher/runs"  # host-local run dirs when not shared
    head_external_ip: bool = True  # the head VM gets an external IP (reached over SSH only); false inside the VPC
    ssh_user: str = "tpu-launcher"  # the user of the run's SSH key pair on the head VM (the tunnel to its job server)
    head_ssh_port: int = 22  # the head VM's SSH port: the one port of the head reached from outside the VPC
    secret_manager_endpoint: Optional[str] = None  # Secret Manager API override (tests), for the run's Ray token


@dataclass
class RayConfig:
    address: Optional[str] = None  # attach to an existing Ray cluster; cloud runs without one create a head VM
    auth_token_file: Optional[str] = None  # that cluster's Ray token (null: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH)
    # the supervisor job's interpreter on that head (null: `python` on its PATH; this interpreter for a head on this
    # machine, the venv's for the run's own head VM: launcher/job.py supervisor_python)
    python: Optional[str] = None
    port: int = 6379  # the head VM's Ray port
    dashboard: bool = False
    dashboard_port: int = 8265  # the head's job server, for cloud runs supervised as a Ray job


@dataclass
class LauncherConfig:
    echo: bool = True  # print host 0's progress lines in this terminal
    dry_run: bool = False  # compose, validate and plan (plan.json); create nothing
    preflight: bool = True  # before a cloud launch, AOT-compile the step for the TPU topology and check HBM
    submit: bool = True  # cloud runs: supervise from a Ray job on the head (this terminal follows, may detach)
    in_job: bool = False  # set on the job's own command line


@dataclass
class SupervisorConfig:
    max_preemptions: int = -1  # restarts after preemptions (node preempted, drained or lost; exit 42); -1: no limit
    max_failures: int = 3  # restarts after crashes (a host killed by a signal), hangs and timeouts; per launch
    backoff_s: float = 2.0  # wait before a restart, doubled after each failure in a row, up to backoff_max_s
    backoff_max_s: float = 60.0
    stop_grace_s: float = 30.0  # Ctrl-C / SIGTERM: time the hosts get to checkpoint at an agreed step


@dataclass
class WatchdogConfig:
    timeout_s: float = 600.0  # a host whose step or phase has not changed for this long is hung
    startup_timeout_s: float = 1800.0  # the same before its first step (init, restore, compile)
    heartbeat_s: float = 1.0  # how often each host rewrites ${run.dir}/hosts/host-<i>.json


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    supervisor: SupervisorConfig = field(default_factory=SupervisorConfig)
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
