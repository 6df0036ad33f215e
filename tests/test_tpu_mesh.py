"""trainer.sharding on TPU devices (compile-only ones from libtpu's topology descriptions, on this CPU): the mesh
follows the physical torus, the hybrid mesh puts slices on dcn, and every host still feeds one distinct data shard."""
import logging

import numpy as np
import pytest

from trainer.preflight import _topology_devices, tpu_compiler_available

pytestmark = pytest.mark.skipif(not tpu_compiler_available(), reason="needs libtpu (pip install -e '.[tpu]')")


@pytest.fixture(scope="module")
def v4_32():
    return _topology_devices("v4", "v4:2x2x4", 1)[0]  # 16 chips, 4 hosts of 2x2x1


def _process_order(devices, shape):
    ordered = sorted(devices, key=lambda d: (getattr(d, "slice_index", 0) or 0, d.process_index, d.id))
    return np.array(ordered, dtype=object).reshape(shape)


def _rows(mesh, batch, process):
    from trainer.sharding import batch_sharding

    held = set()
    for device, index in batch_sharding(mesh).devices_indices_map((batch, 8)).items():
        if device.process_index == process:
            held.update(range(*index[0].indices(batch)))
    return sorted(held)


def test_the_mesh_follows_the_torus_and_every_host_feeds_its_own_shard(v4_32):
    from jax.experimental import mesh_utils

    from trainer.sharding import batch_shard, make_mesh

    mesh = make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, v4_32)
    expected = mesh_utils.create_device_mesh((1, 16, 1, 1), v4_32)
    assert [d.id for d in mesh.devices.flat] == [d.id for d in expected.flat]
    assert [d.id for d in mesh.devices.flat] != [d.id for d in _process_order(v4_32, (1, 16, 1, 1)).flat]
    # the data axis runs along the torus: each run of 4 positions is one z line of neighbouring chips (one ICI
    # hop apart), where process order would put a host's 2x2 plane there
    coords = np.array([d.coords for d in mesh.devices.flat]).reshape(4, 4, 3)
    assert (np.diff(coords, axis=1) == [0, 0, 1]).all()
    # a host's rows are no longer one block: host 0 holds rows 0, 4, 8, 12 of 16
    assert _rows(mesh, 16, 0) == [0, 4, 8, 12]
    shards = [batch_shard(mesh, 16, 8, p) for p in range(4)]
    assert sorted(s[0] for s in shards) == [0, 1, 2, 3] and {s[1] for s in shards} == {4}


def test_hosts_that_share_rows_over_a_tensor_axis_feed_the_same_shard():
    from trainer.sharding import batch_shard, make_mesh

    devices = _topology_devices("v6e", "v6e:4x4", 1)[0]  # 16 chips, 4 hosts of 2x2
    mesh = make_mesh({"data": 4, "fsdp": 1, "tensor": 4}, devices)
    # tensor (4) runs along one physical row of 4 chips, which spans two hosts
    for row in mesh.devices.reshape(4, 4):
        assert len({d.coords[1] for d in row}) == 1 and len({d.process_index for d in row}) == 2
    shards = [batch_shard(mesh, 8, 8, p) for p in range(4)]
    assert {s[1] for s in shards} == {2}
    assert sorted(s[0] for s in shards) == [0, 0, 1, 1]
    for p in range(4):
        for q in range(4):
            assert (shards[p][0] == shards[q][0]) == (_rows(mesh, 8, p) == _rows(mesh, 8, q))


def test_two_slices_put_the_slice_on_dcn():
    from trainer.sharding import batch_shard, make_mesh

    devices = _topology_devices("v4", "v4:2x2x2", 2)[0]  # 2 slices x 8 chips, 2 hosts each
    mesh = make_mesh({"dcn": 2, "data": -1, "fsdp": 2, "tensor": 1}, devices)
    assert dict(mesh.shape) == {"dcn": 2, "data": 4, "fsdp": 2, "tensor": 1}
    for s in range(2):
        assert {d.slice_index for d in mesh.devices[s].flat} == {s}
    shards = sorted(batch_shard(mesh, 16, 8, p) for p in range(4))
    assert shards == [(0, 4), (1, 4), (2, 4), (3, 4)]


def test_a_layout_mesh_utils_cannot_map_falls_back_to_process_order(caplog):
    from trainer.sharding import batch_shard, make_mesh

    devices = _topology_devices("v4", "v4:2x2x2", 1, megacore=False)[0]  # one device per TensorCore
    with caplog.at_level(logging.WARNING, logger="trainer.sharding"):
        mesh = make_mesh({"data": 4, "fsdp": 4, "tensor": 1}, devices)
    assert "no physical TPU layout" in caplog.text
    assert [d.id for d in mesh.devices.flat] == [d.id for d in _process_order(devices, (1, 4, 4, 1)).flat]
    assert _rows(mesh, 16, 1) == [8, 9, 10, 11, 12, 13, 14, 15]
    assert batch_shard(mesh, 16, 8, 1) == (1, 2)
