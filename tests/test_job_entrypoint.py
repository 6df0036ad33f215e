"""The supervisor job's interpreter (launcher/job.py): the head VM's venv python, this interpreter for a head on this
machine, `ray.python` (default: `python`) for a user's head elsewhere; checked by running the entrypoint's first
word through a real shell, as Ray's job server does."""
import os
import shlex
import subprocess
import sys

import ray
from test_head_vm import STAGED, STUBS, bucket_objects

from cluster.head_vm import PYTHON_ENV, head_startup_script
from launcher import job
from launcher.config import compose_config
from script_stubs import run_with_stubs

CLOUD = ["+cluster=v4-8", "cluster.project=p"]


def python_of(word: str, env: dict) -> str:
    """What `sh -c '<word> -c ...'` runs: the interpreter the entrypoint's first word names."""
    proc = subprocess.run(["sh", "-c", f"{word} -c 'import sys; print(sys.executable)'"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_head_vm_of_the_run_runs_its_venv_python(tmp_path):
    word = job.supervisor_python(compose_config(CLOUD), own_head=True)
    assert word == f'"${{{PYTHON_ENV}:-{sys.executable}}}"'
    # the head VM's startup script exports its venv's python before `ray start` (the job server's env)
    stubs = dict(STUBS, python3=STUBS["python3"].replace(
        'echo "venv-ray $*" >>"$STUB_LOG"', f'echo "venv-ray $* {PYTHON_ENV}=${PYTHON_ENV}" >>"$STUB_LOG"'))
    calls = run_with_stubs(head_startup_script(STAGED), tmp_path, stubs, bucket_objects(tmp_path))
    venv_python = tmp_path / "work" / "venv" / "bin" / "python"
    start = [c for c in calls if c.startswith("venv-ray start --head")]
    assert len(start) == 1 and start[0].endswith(f" {PYTHON_ENV}={venv_python}"), calls
    # a job started there runs that python (here a real one standing in for the venv's), not PATH's `python`
    fake_venv = tmp_path / "venv-python"
    fake_venv.symlink_to(sys.executable)
    env = {"PATH": "/usr/bin:/bin", PYTHON_ENV: str(fake_venv)}
    assert python_of(word, env) == str(fake_venv)
    # a head that did not boot from our script (the tests' head on this machine): this interpreter
    assert python_of(word, {"PATH": "/usr/bin:/bin"}) == sys.executable


def test_a_head_on_this_machine_runs_this_interpreter():
    for address in ("127.0.0.1:6379", "localhost:6379", f"{ray.util.get_node_ip_address()}:6379", "auto"):
        word = job.supervisor_python(compose_config([*CLOUD, f"ray.address={address}"]), own_head=False)
        assert word == shlex.quote(sys.executable), address
        assert python_of(word, {"PATH": "/usr/bin:/bin"}) == sys.executable


def test_a_users_head_elsewhere_runs_ray_python():
    elsewhere = [*CLOUD, "ray.address=203.0.113.7:6379"]  # TEST-NET-3: never this machine
    assert job.supervisor_python(compose_config(elsewhere), own_head=False) == "python"
    cfg = compose_config([*elsewhere, "ray.python=/opt/my venv/bin/python"])
    assert job.supervisor_python(cfg, own_head=False) == "'/opt/my venv/bin/python'"
    # set, it wins everywhere: also on our own head VM and on a head on this machine
    assert job.supervisor_python(compose_config([*CLOUD, "ray.python=/x/python"]), own_head=True) == "/x/python"
    here = compose_config([*CLOUD, "ray.address=127.0.0.1:6379", "ray.python=/x/python"])
    assert job.supervisor_python(here, own_head=False) == "/x/python"


def test_entrypoint_runs_the_launcher_with_the_overrides_quoted():
    line = job.entrypoint("'/opt/my venv/bin/python'", ["run.name=a", "data.path=/d with space"])
    assert shlex.split(line) == ["/opt/my venv/bin/python", "-m", "launcher", "run.name=a", "data.path=/d with space",
                                 "launcher.in_job=true", "launcher.preflight=false"]
    out = subprocess.run(["sh", "-c", job.entrypoint(shlex.quote(sys.executable), ["--cfg", "job", "model=tiny"])],
                         capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(job.__file__))))
    assert out.returncode == 0, out.stderr
    assert "in_job: true" in out.stdout and "name: tiny" in out.stdout
