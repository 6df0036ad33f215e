"""trainer/restore.py: a 2-host fsdp=2 run's parameters restored bit-identically onto 1 device and onto 4 (fsdp=4)."""
import os
import subprocess
import sys

import pytest

from podutil import ROOT, TINY, explain, launch, read_json

# Run in a subprocess so that its JAX device count (XLA_FLAGS) can differ from the test process's.
RESTORE = """
import sys
from trainer.digest import params_digest
from trainer.restore import load_run, restore_params
from trainer.sharding import make_mesh
cfg, spec = load_run(sys.argv[1])
mesh = make_mesh({"dcn": 1, "data": 1, "fsdp": int(sys.argv[2]), "tensor": 1})
step = None if sys.argv[3] == "newest" else int(sys.argv[3])
params, step = restore_params(str(cfg.checkpoint.dir), step, mesh, spec)
import jax
shardings = {str(leaf.sharding.spec) for leaf in jax.tree_util.tree_leaves(params)}
print("RESULT", step, params_digest(params), len(jax.devices()), sorted(shardings))
"""


def _restore(run_dir, devices, fsdp, step="newest"):
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    return subprocess.run([sys.executable, "-c", RESTORE, run_dir, str(fsdp), str(step)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("fsdp") / "fsdp")
    proc = launch("run.name=fsdp", f"run.dir={run_dir}", *TINY, "mesh.data=2", "mesh.fsdp=2", "trainer.steps=4",
                  "optimizer.decay_steps=4", "optimizer.warmup_steps=1", "checkpoint.every=4")
    assert proc.returncode == 0, explain(proc)
    return run_dir


@pytest.mark.parametrize("devices,fsdp", [(1, 1), (4, 4)])
def test_restore_onto_another_mesh_is_bit_identical(fsdp_run, devices, fsdp):
    summary = read_json(os.path.join(fsdp_run, "summary.json"))
    proc = _restore(fsdp_run, devices, fsdp)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    _, step, digest, n_devices, rest = line.split(" ", 4)
    assert int(step) == 4 and int(n_devices) == devices
    assert digest == summary["params_digest"]
    if fsdp > 1:  # really sharded on the new mesh, not replicated
        assert "fsdp" in rest


def test_missing_step_is_one_line_checkpoint_error(fsdp_run):
    proc = _restore(fsdp_run, 1, 1, step=3)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("trainer.checkpoint.CheckpointError: step 3 is not saved in"), proc.stderr
    assert "saved steps: 4" in last
