"""Host-side helpers of the launcher: the JAX coordinator's port."""
import random
import socket

from launcher.hosts import _ephemeral_low, coordinator_port


def test_coordinator_port_is_free_and_outside_the_ephemeral_range():
    port = coordinator_port()
    assert 20000 <= port < _ephemeral_low()
    with socket.socket(socket.AF_INET6) as s:  # free on every interface, as the coordinator binds it
        s.bind(("", port))


def test_coordinator_port_skips_a_port_in_use():
    seed_port = coordinator_port(random.Random(7))
    with socket.socket(socket.AF_INET6) as busy:
        busy.bind(("", seed_port))
        busy.listen()
        assert coordinator_port(random.Random(7)) != seed_port
