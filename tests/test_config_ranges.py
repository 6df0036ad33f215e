"""Every key of launcher.schema.Config is checked before anything starts: one bad value per key (or an explicit
"no range" reason) through launcher.__main__.main, one `error:` line naming the key, exit 2, nothing written.

A schema key missing from CASES (or from launcher/ranges.py) fails these tests: a new key needs its check.
"""
import dataclasses
import os
import re
import typing

import pytest

from launcher import ranges, schema
from launcher.__main__ import main
from launcher.config import compose_config
from launcher.errors import UserError
from launcher.validate import check_ranges, validate

NO_RANGE = "no range: "
BOOL = NO_RANGE + "bool, schema-typed (a non-bool fails at composition: test_bools_are_schema_typed)"
INT_GE_1 = ("0", "must be an integer >= 1, got 0")
AXIS = "must be -1 (fill) or an integer >= 1"
URL = "must be null or an http(s)://HOST[:PORT] URL"

# key -> (bad value, or a list of overrides; a fragment of the error line after "error: <key>: ") or NO_RANGE...
# "{t}" in a value is the test's scratch dir.
CASES = {
    "run.name": ("a/b", "'a/b' is not a plain name"),
    "run.dir": ("", "is empty"),

    "model.name": NO_RANGE + "free-form label of the model= group",
    "model.d_model": INT_GE_1,
    "model.n_layers": INT_GE_1,
    "model.n_heads": INT_GE_1,
    "model.d_ff": INT_GE_1,
    "model.vocab_size": INT_GE_1,
    "model.seq_len": INT_GE_1,
    "model.max_seq_len": INT_GE_1,
    "model.positions": ("absolute", "unknown 'absolute' (choose one of: rotary, learned)"),
    "model.dtype": ("float16", "unknown dtype 'float16' (choose one of: float32, bfloat16)"),
    "model.scan_layers": BOOL,
    "model.remat": ("offload", "unknown remat policy 'offload' (choose one of: none, full, dots_saveable)"),
    "model.attention": ("flash", "unknown attention 'flash' (choose one of: auto, xla, splash, blocked)"),

    "data.name": NO_RANGE + "free-form label of the data= group (no data.path: a data.path error)",
    "data.path": ("{t}/missing", "does not exist"),
    "data.cache_dir": NO_RANGE + "free-form local path",
    "data.max_bytes": INT_GE_1,
    "data.prefetch": ("-1", "must be an integer >= 0"),

    "optimizer.name": ("sgd", "unknown optimizer 'sgd' (choose one of: adamw)"),
    "optimizer.lr": ("-1", "must be a number > 0, got -1.0"),
    "optimizer.warmup_steps": ("-5", "must be an integer >= 0, got -5"),
    "optimizer.decay_steps": ("0", "must be null or an integer >= 1"),
    "optimizer.min_lr_ratio": ("2", "must be a number in [0, 1], got 2.0"),
    "optimizer.b1": ("1.5", "must be a number in [0, 1), got 1.5"),
    "optimizer.b2": ("1", "must be a number in [0, 1), got 1.0"),
    "optimizer.eps": ("0", "must be a number > 0, got 0.0"),
    "optimizer.weight_decay": ("-0.1", "must be a number >= 0, got -0.1"),
    "optimizer.clip_norm": ("-1", "must be a number > 0, got -1.0"),

    "trainer.steps": INT_GE_1,
    "trainer.batch_size": INT_GE_1,
    "trainer.seed": ("-1", "must be an integer in 0..4294967295"),
    "trainer.eval_every": ("-1", "must be an integer >= 0"),
    "trainer.eval_batches": INT_GE_1,
    "trainer.log_every": INT_GE_1,
    "trainer.init_timeout_s": INT_GE_1,
    "trainer.host_start_timeout_s": INT_GE_1,
    "trainer.compile_cache": ("gs://b/jax", "must be auto, off or an absolute directory on each host's own disk"),

    "checkpoint.every": INT_GE_1,
    "checkpoint.keep": INT_GE_1,
    "checkpoint.dir": ("{t}/a_file", "exists and is not a directory"),
    "checkpoint.async_save": BOOL,
    "checkpoint.resume": BOOL,
    "checkpoint.ocdbt": BOOL,
    "checkpoint.init_from": ("{t}/missing", "does not exist (point it at a run directory"),

    "mesh.dcn": ("0", AXIS),
    "mesh.data": ("0", AXIS),
    "mesh.fsdp": ("-2", AXIS),
    "mesh.tensor": ("0", AXIS),

    "cluster.provider": ("aws", "unknown provider 'aws' (choose one of: local, gcp)"),
    "cluster.accelerator_type": ("v9-8", "unknown accelerator type 'v9-8'"),
    "cluster.num_slices": INT_GE_1,
    "cluster.hosts": ("0", "must be null or an integer >= 1"),
    "cluster.devices_per_host": ("0", "must be null or an integer >= 1"),
    "cluster.tpu_version": ("v9", "unknown TPU version 'v9' (choose one of: v4, v5e, v5p, v6e)"),
    "cluster.cpus_per_host": ("-1", "must be an integer >= 0"),
    "cluster.slice_name": NO_RANGE + "free-form Ray resource name (null or empty: derived from run.name)",
    "cluster.project": NO_RANGE + "free-form GCP project id, required for gcp by check_gcp (test_cloud_config.py)",
    "cluster.zone": NO_RANGE + "free-form GCP zone, required for gcp by check_gcp (test_cloud_config.py)",
    "cluster.runtime_version": NO_RANGE + "free-form TPU software version (null: the catalog's)",
    "cluster.capacity": ("preemptible", "unknown capacity 'preemptible' (choose one of: on_demand, spot, reserved)"),
    "cluster.network": NO_RANGE + "free-form VPC network name",
    "cluster.subnetwork": NO_RANGE + "free-form subnetwork name",
    "cluster.service_account": NO_RANGE + "free-form service account email",
    "cluster.labels": (["+cluster.labels.Team=ml"], "must be GCP labels"),
    "cluster.bucket": ("s3://b/runs", "must be null or a gs://BUCKET[/PREFIX] URL, got 's3://b/runs'"),
    "cluster.price_on_demand": ("-1", "must be null or a number >= 0"),
    "cluster.price_spot": ("-0.5", "must be null or a number >= 0"),
    "cluster.tpu_api_endpoint": ("ftp://x", URL),
    "cluster.provision_timeout_s": INT_GE_1,
    "cluster.delete_on_exit": BOOL,
    "cluster.compute_api_endpoint": ("localhost:8080", URL),
    "cluster.head_machine_type": ("", "must be a non-empty string, got ''"),
    "cluster.head_image": ("' '", "must be a non-empty string, got ' '"),
    "cluster.shared_run_dir": BOOL + "; null: per provider",
    "cluster.host_run_root": ("relative/runs", "must be an absolute path"),
    "cluster.head_external_ip": BOOL,
    "cluster.ssh_user": ("Root", "must be a POSIX user name"),
    "cluster.secret_manager_endpoint": ("gopher://x", URL),

    "ray.address": NO_RANGE + "free-form, handed to Ray (HOST:PORT, ray://..., auto)",
    "ray.auth_token_file": ("", "must be null or a non-empty string"),
    "ray.python": ("' '", "must be null or a non-empty string, got ' '"),
    "ray.port": ("0", "must be an integer in 1..65535"),
    "cluster.head_ssh_port": ("70000", "must be an integer in 1..65535"),
    "ray.dashboard": BOOL,
    "ray.dashboard_port": ("70000", "must be an integer in 1..65535"),

    "launcher.echo": BOOL,
    "launcher.dry_run": BOOL,
    "launcher.preflight": BOOL,
    "launcher.submit": BOOL,
    "launcher.in_job": BOOL,

    "supervisor.max_preemptions": ("-2", "must be -1 (no limit) or an integer >= 0"),
    "supervisor.max_failures": ("-1", "must be an integer >= 0"),
    "supervisor.backoff_s": ("-1", "must be a number >= 0"),
    "supervisor.backoff_max_s": ("-1", "must be a number >= 0"),
    "supervisor.stop_grace_s": ("-1", "must be a number >= 0"),

    "watchdog.timeout_s": ("0", "must be a number > 0, got 0.0"),
    "watchdog.startup_timeout_s": ("-1", "must be a number > 0"),
    "watchdog.heartbeat_s": ("0", "must be a number > 0"),
}

# Values in range for one key but out of line with another: (overrides, key, fragment).
RELATIONS = [
    (["watchdog.heartbeat_s=700"], "watchdog.heartbeat_s", "must be < watchdog.timeout_s = 600.0, got 700.0"),
    (["watchdog.startup_timeout_s=0.5"], "watchdog.heartbeat_s", "must be < watchdog.startup_timeout_s = 0.5"),
    (["supervisor.backoff_max_s=1"], "supervisor.backoff_max_s", "must be >= supervisor.backoff_s = 2.0, got 1.0"),
    (["ray.dashboard_port=6379"], "ray.dashboard_port", "must be != ray.port = 6379"),
]

# Edge values that are in range.
GOOD = ["optimizer.min_lr_ratio=0", "optimizer.min_lr_ratio=1", "optimizer.b1=0", "optimizer.b2=0.999",
        "optimizer.warmup_steps=0", "optimizer.weight_decay=0", "optimizer.decay_steps=1", "optimizer.lr=1e-9",
        "supervisor.max_preemptions=-1", "supervisor.max_preemptions=0", "supervisor.max_failures=0",
        "supervisor.backoff_s=0", "supervisor.backoff_max_s=2", "supervisor.stop_grace_s=0",
        "data.prefetch=0", "trainer.eval_every=0", "trainer.seed=4294967295", "cluster.cpus_per_host=0",
        "cluster.price_spot=0", "cluster.price_on_demand=null", "cluster.hosts=null", "mesh.data=-1",
        "ray.port=1", "ray.dashboard_port=65535", "cluster.ssh_user=_a-1", "+cluster.labels.team=ml-1",
        "+cluster.labels.empty=", "cluster.bucket=gs://b/runs", "cluster.tpu_api_endpoint=http://127.0.0.1:9",
        "cluster.secret_manager_endpoint=https://secretmanager.googleapis.com", "watchdog.heartbeat_s=0.01",
        "ray.auth_token_file=/no/such/file/yet", "cluster.tpu_version=v6e",
        "trainer.compile_cache=off", "trainer.compile_cache=/var/cache/jax"]


def schema_leaves(cls=schema.Config, prefix=""):
    """Every leaf key of the schema ("model.d_model", ..., "cluster.labels"), walking nested dataclasses."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from schema_leaves(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield prefix + f.name


LEAVES = list(schema_leaves())


def test_every_schema_key_has_a_case():
    assert len(LEAVES) > 80, LEAVES
    missing = [k for k in LEAVES if k not in CASES]
    assert not missing, f"schema keys without a case here (and maybe a check in launcher/ranges.py): {missing}"
    assert not [k for k in CASES if k not in LEAVES], "cases for keys the schema does not have"


def test_every_schema_key_has_a_range():
    assert not [k for k in LEAVES if k not in ranges.RANGES], "add the key's range to launcher/ranges.py"
    assert not [k for k in ranges.RANGES if k not in LEAVES], "launcher/ranges.py lists keys the schema lacks"
    for key, allowed in ranges.RANGES.items():
        assert allowed.text, key
        if allowed.ok is not None:  # a checked key gets a bad value above, not a "no range" marker
            assert not isinstance(CASES[key], str), key


def _overrides(key, case, t):
    value, _ = case
    return [v.format(t=t) for v in value] if isinstance(value, list) else [f"{key}={value.format(t=t)}"]


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("not a directory\n")
    monkeypatch.setenv("TPU_LAUNCHER_CACHE", str(tmp_path / "cache"))
    return tmp_path


@pytest.mark.parametrize("key", [k for k in CASES if not isinstance(CASES[k], str)])
def test_bad_value_is_one_error_line_naming_the_key(key, scratch, capsys):
    t = scratch
    rundir = [] if key == "run.dir" else [f"run.dir={t}/r"]
    code = main(["model=tiny", *rundir, *_overrides(key, CASES[key], t)])
    out, err = capsys.readouterr()
    assert code == 2, (key, out, err)
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert re.fullmatch(rf"error: {re.escape(key)}: .+ \(.+\)", lines[0]), lines[0]
    assert CASES[key][1] in lines[0], lines[0]
    assert "Traceback" not in out + err
    assert sorted(os.listdir(t)) == ["a_file"], os.listdir(t)  # no run dir, no corpus cache, no checkpoints


@pytest.mark.parametrize("overrides, key, fragment", RELATIONS)
def test_keys_bounded_by_other_keys(overrides, key, fragment, scratch, capsys):
    code = main(["model=tiny", f"run.dir={scratch}/r", *overrides])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: {key}: ") and fragment in err and len(err.splitlines()) == 1, err
    assert sorted(os.listdir(scratch)) == ["a_file"]


@pytest.mark.parametrize("key", [k for k in CASES if isinstance(CASES[k], str) and CASES[k].startswith(BOOL)])
def test_bools_are_schema_typed(key):
    with pytest.raises(UserError) as info:
        compose_config([f"{key}=maybe"])
    assert info.value.key == key and "not a valid bool" in info.value.problem


@pytest.mark.parametrize("override", GOOD)
def test_edge_values_in_range_pass(override):
    check_ranges(compose_config([override]))


@pytest.mark.parametrize("overrides", [[], ["model=tiny"], ["model=base"], ["data=shards"], ["+cluster=v4-32"],
                                       ["+cluster=v4-32x2"], ["+cluster=v5litepod-16"], ["+cluster=v5p-32"],
                                       ["+cluster=v6e-16"], ["+cluster=v4-8"]])
def test_shipped_configs_are_in_range(overrides):
    check_ranges(compose_config(overrides))


def test_edge_values_pass_the_whole_validation(corpus_cache, tmp_path):
    cfg = compose_config(["model=tiny", "data.max_bytes=1500000", f"run.dir={tmp_path}/r", "optimizer.min_lr_ratio=0",
                          "supervisor.max_preemptions=-1", "optimizer.warmup_steps=0", "data.prefetch=0",
                          "supervisor.backoff_s=0", "supervisor.backoff_max_s=0"])
    plan = validate(cfg)
    assert plan.devices == 4
    assert not os.path.exists(tmp_path / "r")
