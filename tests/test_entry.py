"""The Hydra-native entry (`python -m launcher`): Hydra's --help, --cfg job, --info and shell completion, -m sweeps
(each run its own launch and run dir, nothing written outside them), and the completed-run shortcut."""
import hashlib
import os
import shutil

import pytest
import yaml

from launcher.__main__ import _completed_summary, main
from launcher.config import compose_config
from launcher.rundir import RunDir
from podutil import TINY, explain, launch, read_json


def cli(*args, cwd, env=None):
    """The real CLI in `cwd`, which must stay empty (Hydra writes no outputs/, multirun/ or .hydra/)."""
    proc = launch(*args, cwd=str(cwd), env=env, timeout=120)
    assert os.listdir(cwd) == [], os.listdir(cwd)
    return proc


# ---- Hydra's flags ----

def test_help_lists_the_config_groups_and_their_options(tmp_path):
    proc = cli("--help", cwd=tmp_path)
    assert proc.returncode == 0, explain(proc)
    out = proc.stdout
    assert "== Configuration groups ==" in out
    groups = {line.split(":")[0]: line.split(": ")[1].split(", ") for line in out.splitlines()
              if ": " in line and line.split(":")[0] in ("model", "cluster", "data", "optimizer")}
    assert groups["model"] == ["1b", "base", "small", "tiny"]
    assert groups["data"] == ["shards", "stdlib"]
    assert {"local", "v4-32", "v4-8", "v6e-16"} <= set(groups["cluster"])
    assert "optimizer" in groups
    # our examples (conf/config.yaml hydra.help) and the composed config, with the local pod by default
    assert "python -m launcher -m model=tiny trainer.seed=0,1" in out
    assert "provider: local" in out and "== Config ==" in out


def test_cfg_job_prints_the_composed_config(tmp_path):
    proc = cli("--cfg", "job", "model=tiny", "trainer.seed=7", cwd=tmp_path)
    assert proc.returncode == 0, explain(proc)
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["model"]["name"] == "tiny" and cfg["model"]["d_model"] == 64
    assert cfg["trainer"]["seed"] == 7
    assert cfg["cluster"]["provider"] == "local"  # no +cluster=NAME: the local pod, as for a launch
    assert cfg["run"]["dir"] == "runs/${run.name}"  # Hydra's --cfg job: unresolved (--resolve resolves)
    assert "hydra" not in cfg
    # `--cfg` alone, as before: the resolved job config
    proc = cli("--cfg", "+cluster=v4-8", "run.name=x", cwd=tmp_path)
    assert proc.returncode == 0, explain(proc)
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["run"]["dir"] == "runs/x" and cfg["cluster"]["accelerator_type"] == "v4-8"


def test_info_and_shell_completion(tmp_path):
    proc = cli("--info", "defaults", "model=tiny", cwd=tmp_path)
    assert proc.returncode == 0, explain(proc)
    assert "Defaults List" in proc.stdout and "model/tiny" in proc.stdout and "cluster/local" in proc.stdout
    proc = cli("--shell-completion", "install=bash", cwd=tmp_path)
    assert proc.returncode == 0, explain(proc)
    assert "complete -o nospace -o default -F hydra_bash_completion tpu-launch" in proc.stdout
    proc = cli("-sc", "query=bash", cwd=tmp_path, env={"COMP_LINE": "tpu-launch model="})
    assert proc.returncode == 0, explain(proc)
    assert proc.stdout.split() == ["model=1b", "model=base", "model=small", "model=tiny"]


@pytest.mark.parametrize("args, expected", [
    (["--cfg", "job", "model=nope"], "error: model: unknown choice 'nope' (choose one of: 1b, base, small, tiny)"),
    (["--info", "trainer.stepz=1"], "error: trainer.stepz: "),
    (["--frobnicate"], "error: --frobnicate: unknown flag"),
    (["--config-dir=/tmp"], "error: --config-dir: is not supported by the launcher"),
    (["-m", "--cfg", "job", "trainer.seed=0,1"], "error: --cfg: cannot be combined with -m"),
    (["trainer.seed=0,1"], "error: trainer.seed: 'trainer.seed=0,1' has several values (add -m"),
    (["-m", "trainer.seed=0,-1"], "error: trainer.seed: must be an integer in 0..4294967295, got -1"),
    (["-m", "trainer.seed=interval(0,1)"], "error: trainer.seed: 'trainer.seed=interval(0,1)' is not a list"),
    (["-m", "model=glob(*)"], "error: model: 'model=glob(*)' cannot be expanded here (glob) (list the values"),
    (["-m", "trainer.seed=0,1", "run.dir=shared"], "error: run.dir: sweep runs default-trainer.seed=0 and "
                                                    "default-trainer.seed=1 would share"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(args, expected, tmp_path, monkeypatch, capsys,
                                                         corpus_cache):
    """In-process, as tpu-launch calls it: a bad sweep value is found before the first run starts."""
    monkeypatch.chdir(tmp_path)
    code = main(["model=tiny", "data.max_bytes=1500000", *args])
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert len(err.splitlines()) == 1 and err.startswith(expected), err
    assert "Traceback" not in out + err
    assert os.listdir(tmp_path) == []  # no run dir, no outputs/ or multirun/


# ---- -m: a sweep of launches ----

def test_sweep_of_two_seeds_runs_each_in_its_own_run_dir(tmp_path, corpus_cache):
    # one host per pod: the sweep, not the pod, is under test
    proc = launch("-m", "trainer.seed=0,1", *TINY, "trainer.steps=4", "checkpoint.every=4", "cluster.hosts=1",
                  cwd=str(tmp_path), timeout=400)
    assert proc.returncode == 0, explain(proc)
    names = ["default-trainer.seed=0", "default-trainer.seed=1"]
    assert os.listdir(tmp_path) == ["runs"]  # nothing but the run dirs
    assert sorted(os.listdir(tmp_path / "runs")) == names
    lines = [line for line in proc.stdout.splitlines() if line.startswith("[launcher]   ")]
    assert len(lines) == 2, proc.stdout
    for i, (name, line) in enumerate(zip(names, lines)):
        run_dir = tmp_path / "runs" / name
        summary = read_json(run_dir / "summary.json")
        assert summary["status"] == "completed" and summary["final_step"] == 4 and summary["run"] == name
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["trainer"]["seed"] == i
        assert line == (f"[launcher]   {i + 1}/2 completed: step 4/4, loss {summary['final_loss']:.4f}: "
                        f"{run_dir}"), line


def test_sweep_names_runs_after_the_swept_keys():
    from launcher.sweep import expand

    combos = expand(["model=tiny", "trainer.seed=0,1", "+cluster=v4-8,local", "run.name=a,b"])
    assert len(combos) == 8
    assert combos[0] == (["model=tiny", "trainer.seed=0", "+cluster=v4-8", "run.name=a"],
                         ["trainer.seed=0", "cluster=v4-8"])
    assert combos[-1][1] == ["trainer.seed=1", "cluster=local"]
    assert [c[0] for c in expand(["trainer.seed=range(2,4)"])] == [["trainer.seed=2"], ["trainer.seed=3"]]


# ---- a completed run typed again ----

def _snapshot(root):
    """Every file under root: its bytes' digest and mtime."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = (hashlib.sha256(fh.read()).hexdigest(), os.stat(p).st_mtime_ns)
    return out


def test_completed_run_typed_again_prints_its_result_and_starts_nothing(trained_run, tmp_path):
    run_dir = str(tmp_path / "copy")
    shutil.copytree(trained_run, run_dir)
    before = _snapshot(run_dir)
    summary = read_json(os.path.join(run_dir, "summary.json"))
    proc = launch("run.name=trained", f"run.dir={run_dir}", *TINY, "trainer.steps=12", "optimizer.decay_steps=12",
                  "optimizer.warmup_steps=3", "checkpoint.every=4")
    assert proc.returncode == 0, explain(proc)
    line = f"[launcher] run trained already completed 12 steps; nothing started (raise trainer.steps to train on)"
    assert proc.stdout.startswith(line), proc.stdout
    assert f"loss {summary['final_loss']:.4f}, test loss {summary['eval']['eval_loss']:.4f}" in proc.stdout
    assert run_dir in proc.stdout
    assert "hosts placed" not in proc.stdout and proc.stderr == ""
    assert _snapshot(run_dir) == before  # summary, goodput ledger, events, lock, token: not one byte or mtime


def test_more_steps_or_no_resume_or_a_live_launch_is_no_shortcut(trained_run, tmp_path):
    run_dir = str(tmp_path / "copy")
    shutil.copytree(trained_run, run_dir)

    def cfg(*overrides):
        return compose_config([f"run.dir={run_dir}", *TINY, *overrides])

    assert _completed_summary(cfg("trainer.steps=12"))["final_step"] == 12
    assert _completed_summary(cfg("trainer.steps=16")) is None  # resumes, as before
    assert _completed_summary(cfg("trainer.steps=8")) is None
    assert _completed_summary(cfg("trainer.steps=12", "checkpoint.resume=false")) is None
    live = RunDir(run_dir)
    live.acquire()  # a launch of the run is live: the command follows it instead
    try:
        assert _completed_summary(cfg("trainer.steps=12")) is None
    finally:
        live.release()
