"""The wheel ships conf/ and runs `python -m launcher` outside a checkout (no repo on the path)."""
import os
import subprocess
import sys

import pytest

from podutil import ROOT, TINY, explain, read_json


@pytest.fixture(scope="module")
def installed(tmp_path_factory, corpus_cache):
    base = tmp_path_factory.mktemp("wheel")
    wheels, site = base / "dist", base / "site"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(wheels), ROOT], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    wheel = next(wheels.glob("*.whl"))
    inst = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                           str(wheel)], capture_output=True, text=True, timeout=300)
    assert inst.returncode == 0, inst.stderr
    outside = base / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    return site, outside, env


def _cli(installed, *args, timeout=300):
    site, outside, env = installed
    return subprocess.run([sys.executable, "-m", "launcher", *args], cwd=outside, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_conf_ships_in_wheel(installed):
    site, _, _ = installed
    assert (site / "conf" / "config.yaml").is_file()
    assert (site / "conf" / "model" / "tiny.yaml").is_file()
    assert (site / "conf" / "cluster" / "local.yaml").is_file()
    proc = _cli(installed, "--cfg", "model=tiny")
    assert proc.returncode == 0, explain(proc)
    assert "name: tiny" in proc.stdout and "devices_per_host: 2" in proc.stdout
    import launcher

    assert not launcher.__file__.startswith(str(site))  # the test process uses the checkout...
    probe = subprocess.run([sys.executable, "-c", "import launcher, conf; print(launcher.__file__, conf.__file__)"],
                           cwd=installed[1], env=installed[2], capture_output=True, text=True)
    assert str(site) in probe.stdout and ROOT not in probe.stdout  # ...the CLI used the wheel


def test_wheel_trains_outside_checkout(installed, corpus_cache):
    _, outside, _ = installed
    proc = _cli(installed, "run.name=wheel", *TINY, "trainer.steps=2", "checkpoint.every=2")
    assert proc.returncode == 0, explain(proc)
    summary = read_json(outside / "runs" / "wheel" / "summary.json")
    assert summary["status"] == "completed" and summary["final_step"] == 2
