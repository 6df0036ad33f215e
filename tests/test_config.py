"""Tests for config composition (launcher.config) and that each bad input is one `error:` line, exit 2, no writes."""
import json
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from launcher.__main__ import main  # noqa: E402
from launcher.config import compose_config  # noqa: E402
from launcher.errors import UserError  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

REQUIRED_KEYS = ("run.name", "run.dir", "trainer.steps", "trainer.batch_size", "trainer.seed", "trainer.eval_every",
                 "trainer.log_every", "checkpoint.every", "checkpoint.keep", "checkpoint.dir", "data.path",
                 "mesh.data", "mesh.fsdp", "mesh.tensor", "cluster.hosts", "cluster.devices_per_host")


# ---- composition ----

def test_defaults_compose():
    cfg = compose_config([])
    assert cfg.model.name == "small"
    assert cfg.data.name == "stdlib" and cfg.data.path is None
    assert cfg.cluster.provider == "local"
    assert cfg.cluster.hosts == 2 and cfg.cluster.devices_per_host == 2
    assert cfg.run.name == "default"
    assert cfg.run.dir == "runs/default"
    assert cfg.checkpoint.dir == "runs/default/checkpoints"
    assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor) == (-1, 1, 1)


def test_every_required_key_exists():
    cfg = compose_config([])
    for key in REQUIRED_KEYS:
        parent, _, leaf = key.rpartition(".")
        assert leaf in OmegaConf.select(cfg, parent), key
        assert not OmegaConf.is_missing(OmegaConf.select(cfg, parent), leaf), key
    for key in REQUIRED_KEYS:
        if key != "data.path":  # null = the embedded corpus
            assert OmegaConf.select(cfg, key) is not None, key


def test_run_name_flows_into_run_and_checkpoint_dirs():
    cfg = compose_config(["run.name=demo-1"])
    assert cfg.run.dir == "runs/demo-1" and cfg.checkpoint.dir == "runs/demo-1/checkpoints"


def test_explicit_cluster_choice_with_overrides():
    cfg = compose_config(["+cluster=local", "cluster.hosts=4", "cluster.devices_per_host=4"])
    assert cfg.cluster.provider == "local"
    assert cfg.cluster.hosts == 4 and cfg.cluster.devices_per_host == 4


def test_cluster_override_without_cluster_choice():
    cfg = compose_config(["cluster.hosts=3"])
    assert cfg.cluster.hosts == 3 and cfg.cluster.devices_per_host == 2 and cfg.cluster.provider == "local"


def test_model_choices():
    tiny = compose_config(["model=tiny"])
    assert tiny.model.name == "tiny"
    assert (tiny.model.d_model, tiny.model.n_layers, tiny.model.n_heads, tiny.model.d_ff) == (64, 2, 4, 256)
    base = compose_config(["model=base", "model.dtype=bfloat16"])
    assert base.model.name == "base" and base.model.d_model == 768
    big = compose_config(["model=1b"]).model
    assert (big.d_model, big.n_layers, big.n_heads, big.d_ff, big.seq_len) == (2048, 20, 16, 8192, 2048)
    assert big.dtype == "bfloat16" and big.scan_layers is True and big.remat == "full" and big.attention == "auto"


def test_typed_overrides_are_converted():
    cfg = compose_config(["trainer.steps=7", "optimizer.lr=0.5", "mesh.tensor=2"])
    assert cfg.trainer.steps == 7 and isinstance(cfg.trainer.steps, int)
    assert cfg.optimizer.lr == 0.5 and cfg.mesh.tensor == 2


@pytest.mark.parametrize("overrides, key", [
    (["model=nope"], "model"),
    (["trainer.stepz=1"], "trainer.stepz"),
    (["trainer.steps=abc"], "trainer.steps"),
])
def test_compose_errors_are_user_errors_naming_the_key(overrides, key):
    with pytest.raises(UserError) as info:
        compose_config(overrides)
    assert info.value.key == key
    assert str(info.value).startswith(f"{key}: ")
    assert "\n" not in str(info.value)


# ---- bad inputs through the CLI ----

@pytest.fixture
def bad_env(tmp_path, monkeypatch):
    """A scratch dir holding an empty dir and a regular file; the corpus cache points into it."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file").write_text("not a directory\n")
    cache = tmp_path / "cache"
    monkeypatch.setenv("TPU_LAUNCHER_CACHE", str(cache))
    return tmp_path


def bad_cases(t):
    """(overrides, text the error line must contain after 'error: '), key first."""
    return [
        (["model=nope"], "model: unknown choice 'nope'"),
        (["data=nope"], "data: unknown choice 'nope'"),
        (["trainer.stepz=1"], "trainer.stepz"),
        (["trainer.steps=abc"], "trainer.steps"),
        (["mesh.data=3"], "mesh: "),
        (["mesh.fsdp=-1"], "mesh.fsdp"),  # mesh.data is -1 by default: two fill axes
        (["trainer.batch_size=6"], "trainer.batch_size"),  # 2 hosts x 2 devices, data=4
        (["model.seq_len=1000"], "model.seq_len"),  # model=small has max_seq_len 512
        ([f"data.path={t}/does-not-exist"], "data.path"),
        ([f"data.path={t}/empty"], "data.path"),
        (["data=shards"], "data.path"),
        ([f"checkpoint.dir={t}/a_file"], "checkpoint.dir"),
        (["run.name=a/b"], "run.name"),
        (["model.attention=splash"], "model.attention: splash is a TPU kernel"),  # the local pod runs on CPU
    ]


def _check_one_error_line(stderr: str, stdout: str, expected: str, rundir):
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: " + expected), lines[0]
    assert "Traceback" not in stderr and "Traceback" not in stdout
    assert not os.path.exists(rundir), f"{rundir} was created"


def _scratch_untouched(t):
    assert sorted(os.listdir(t)) == ["a_file", "empty"], os.listdir(t)  # no run dir, no corpus, no checkpoints
    assert os.listdir(t / "empty") == []
    assert (t / "a_file").read_text() == "not a directory\n"


def test_bad_inputs_in_process(bad_env, capsys):
    """Every listed bad input through launcher.__main__.main: exit 2, one line naming the key, nothing written."""
    t = bad_env
    for overrides, expected in bad_cases(t):
        rundir = t / "r"
        code = main([f"run.dir={rundir}", *overrides])
        out, err = capsys.readouterr()
        assert code == 2, (overrides, err)
        _check_one_error_line(err, out, expected, rundir)
    _scratch_untouched(t)


def test_bad_inputs_real_cli(bad_env):
    """A few of them through the real `python -m launcher` subprocess (run concurrently to save time)."""
    t = bad_env
    env = dict(os.environ, PYTHONPATH=REPO, TPU_LAUNCHER_CACHE=str(t / "cache"))
    env.pop("XLA_FLAGS", None)
    picked = [c for c in bad_cases(t) if c[1].split(":")[0] in
              ("data", "trainer.steps", "trainer.batch_size", "checkpoint.dir", "run.name")]
    assert len(picked) == 5
    procs = [(ov, exp, subprocess.Popen([sys.executable, "-m", "launcher", f"run.dir={t}/r{i}", *ov], cwd=REPO,
                                        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
             for i, (ov, exp) in enumerate(picked)]
    for i, (ov, exp, proc) in enumerate(procs):
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 2, (ov, err)
        _check_one_error_line(err, out, exp, t / f"r{i}")
    _scratch_untouched(t)


@pytest.mark.parametrize("key", ["run.dir", "checkpoint.dir"])
def test_empty_run_or_checkpoint_dir_is_rejected(key, tmp_path, monkeypatch):
    from launcher.validate import validate

    monkeypatch.setenv("TPU_LAUNCHER_CACHE", str(tmp_path / "cache"))
    overrides = ["model=tiny", "data.max_bytes=1500000", f"{key}="]
    if key != "run.dir":
        overrides.append(f"run.dir={tmp_path}/r")
    cfg = compose_config(overrides)
    assert OmegaConf.select(cfg, key) == ""
    with pytest.raises(UserError) as info:
        validate(cfg)
    assert info.value.key == key


def test_dry_run_plans_without_starting_anything(tmp_path, monkeypatch, capsys):
    from launcher.__main__ import main

    monkeypatch.setenv("TPU_LAUNCHER_CACHE", str(tmp_path / "cache"))
    code = main(["launcher.dry_run=true", "model=tiny", "data.max_bytes=1500000", f"run.dir={tmp_path}/r",
                 "+cluster=local", "cluster.hosts=4", "cluster.devices_per_host=4", "mesh.fsdp=2"])
    assert code == 0
    assert "dry run: nothing created" in capsys.readouterr().out
    plan = json.loads((tmp_path / "r" / "plan.json").read_text())
    assert plan["hosts"] == 4 and plan["devices"] == 16 and plan["mesh"] == {"data": 8, "fsdp": 2, "tensor": 1}
    assert plan["preflight"] == "analytic" and plan["hbm_bytes_per_chip"] is None
    assert sorted(os.listdir(tmp_path / "r")) == ["plan.json"]  # no lock, logs, config or checkpoints
