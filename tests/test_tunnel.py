"""SSH tunnel to the head's job server: the run's key pair, the 127.0.0.1-only forward through a real SSH server
(tests/ssh_server.py, asyncssh on loopback), refused keys, host key pinning and clean shutdown."""
import os
import socket
import stat
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psutil
import pytest

from launcher.tunnel import KeyPair, SshTunnel, TunnelError, ensure_keypair
from ssh_server import SshServer

USER = "launcher"


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _ssh_children() -> list:
    out = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.name() == "ssh" and child.status() != psutil.STATUS_ZOMBIE:
                out.append(child)
        except psutil.NoSuchProcess:
            pass
    return out


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture
def keys(tmp_path) -> KeyPair:
    return ensure_keypair(str(tmp_path / "record"), USER)


@pytest.fixture
def servers():
    """Start SshServers through this; all are stopped at the end."""
    started = []

    def start(public_key, **kwargs):
        server = SshServer(public_key, **kwargs)
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def tunnels():
    """Make SshTunnels through this; all are closed at the end, and no ssh process may be left behind."""
    made = []

    def make(*args, **kwargs):
        tunnel = SshTunnel(*args, **kwargs)
        made.append(tunnel)
        return tunnel

    yield make
    for tunnel in made:
        tunnel.close()
    leftover = _ssh_children()
    for proc in leftover:
        proc.kill()
    assert not leftover, f"ssh processes left behind: {leftover}"


@pytest.fixture
def http_server():
    """A tiny HTTP server on 127.0.0.1 standing in for the head's job server; yields its port."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's naming
            body = f"job server says hi to {self.path}".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()


def _tunnel(tunnels, server, keys, tmp_path, remote_port, **kwargs):
    return tunnels("127.0.0.1", USER, keys.private_path, str(tmp_path / "record" / "known_hosts"),
                   remote_port=remote_port, ssh_port=server.port, **kwargs)


def test_keypair_is_made_once_private_and_reused(tmp_path):
    record = tmp_path / "runs" / "demo"
    keys = ensure_keypair(str(record), USER)
    assert _mode(record) == 0o700
    assert keys.private_path == str(record / "ssh_key")
    assert _mode(keys.private_path) == 0o600
    key_type, blob, comment = keys.public_key.split()
    assert (key_type, comment) == ("ssh-ed25519", USER) and blob.startswith("AAAA")
    assert "\n" not in keys.public_key
    assert keys.metadata_value(USER) == f"{USER}:ssh-ed25519 {blob} {USER}"
    assert keys.metadata_value("other") == f"other:ssh-ed25519 {blob} other"
    private_bytes = open(keys.private_path, "rb").read()
    assert b"PRIVATE KEY" in private_bytes and private_bytes.decode() not in keys.metadata_value(USER)

    os.chmod(keys.private_path, 0o644)  # copied around carelessly: ssh would refuse it
    again = ensure_keypair(str(record), USER)
    assert again == keys and open(again.private_path, "rb").read() == private_bytes
    assert _mode(again.private_path) == 0o600
    assert sorted(os.listdir(record)) == ["ssh_key", "ssh_key.pub"]

    os.remove(keys.public_path)  # the public half is derived again from the private one
    assert ensure_keypair(str(record), USER).public_key.split()[:2] == keys.public_key.split()[:2]

    other = ensure_keypair(str(tmp_path / "other"), USER)
    assert other.public_key != keys.public_key
    for bad in ("root\nuser2:ssh-ed25519 AAAA", "a:b", "-oProxyCommand=x", ""):
        with pytest.raises(ValueError):
            keys.metadata_value(bad)


def test_tunnel_reaches_the_job_server_on_loopback_only(tmp_path, keys, servers, tunnels, http_server):
    server = servers(keys.public_key)
    tunnel = _tunnel(tunnels, server, keys, tmp_path, http_server)
    port = tunnel.open()
    assert tunnel.url == f"http://127.0.0.1:{port}" and port != http_server
    with urllib.request.urlopen(tunnel.url + "/api/version", timeout=5) as resp:
        assert resp.read() == b"job server says hi to /api/version"
    assert tunnel.open() == port  # already open: the same tunnel

    ssh = psutil.Process(tunnel.pid)
    cmdline = ssh.cmdline()
    assert cmdline[-1] == f"{USER}@127.0.0.1" and cmdline[cmdline.index("-L") + 1] == \
        f"127.0.0.1:{port}:127.0.0.1:{http_server}"
    for option in ("StrictHostKeyChecking=accept-new", "BatchMode=yes", "IdentitiesOnly=yes", "ControlMaster=no",
                   "ExitOnForwardFailure=yes", "ServerAliveInterval=15"):
        assert option in cmdline
    assert "-N" in cmdline and cmdline[cmdline.index("-F") + 1] == "/dev/null"
    listening = [c for c in ssh.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert [tuple(c.laddr) for c in listening] == [("127.0.0.1", port)]
    assert server.accepted_auth == [(USER, server.accepted_auth[0][1])]
    assert server.forwarded and set(server.forwarded) == {("127.0.0.1", http_server)}
    assert server.refused_forwards == [] and server.sessions_refused == 0  # -N: no shell, no exec

    known_hosts = tmp_path / "record" / "known_hosts"
    assert _mode(known_hosts) == 0o600
    assert server.host_public_key in known_hosts.read_text()
    assert f"[127.0.0.1]:{server.port}" in known_hosts.read_text()


def test_another_key_is_refused_in_one_line(tmp_path, keys, servers, tunnels):
    server = servers(keys.public_key)
    stranger = ensure_keypair(str(tmp_path / "stranger"), USER)
    tunnel = tunnels("127.0.0.1", USER, stranger.private_path, str(tmp_path / "stranger" / "known_hosts"),
                     ssh_port=server.port, connect_timeout_s=10)
    started = time.monotonic()
    with pytest.raises(TunnelError) as err:
        tunnel.open()
    assert time.monotonic() - started < 5  # refused, not retried until the timeout
    message = str(err.value)
    assert err.value.kind == "auth" and "\n" not in message
    assert "refused the run's key" in message and "Permission denied (publickey)" in message
    assert stranger.private_path in message and "PRIVATE KEY" not in message
    assert server.accepted_auth == [] and server.refused_auth
    assert not tunnel.alive and tunnel.local_port is None


def test_a_changed_host_key_is_refused(tmp_path, keys, servers, tunnels, http_server):
    first = servers(keys.public_key)
    known_hosts = tmp_path / "record" / "known_hosts"
    with _tunnel(tunnels, first, keys, tmp_path, http_server) as tunnel:
        with urllib.request.urlopen(tunnel.url, timeout=5) as resp:
            assert resp.status == 200
    pinned = known_hosts.read_text()
    assert first.host_public_key in pinned
    first.stop()

    # the same address and port, another host key: a re-created head VM, or someone in between
    second = servers(keys.public_key, port=first.port)
    assert second.host_key_fingerprint != first.host_key_fingerprint
    tunnel = _tunnel(tunnels, second, keys, tmp_path, http_server)
    with pytest.raises(TunnelError) as err:
        tunnel.open()
    message = str(err.value)
    assert err.value.kind == "host_key" and "\n" not in message
    assert message.startswith(f"the head's SSH host key changed since it was pinned in {known_hosts}")
    assert second.host_key_fingerprint in message and "remove that file" in message
    assert second.accepted_auth == [] and second.forwarded == []  # refused before the key was even offered
    assert known_hosts.read_text() == pinned and _mode(known_hosts) == 0o600

    # the same host key again (the head VM as it was) is still accepted
    second.stop()
    host_key_file = tmp_path / "host_key"
    host_key_file.write_bytes(first.host_key.export_private_key())
    servers(keys.public_key, port=first.port, host_key_path=str(host_key_file))
    assert tunnel.open()


def test_close_stops_ssh_and_the_port(tmp_path, keys, servers, tunnels, http_server):
    server = servers(keys.public_key)
    tunnel = _tunnel(tunnels, server, keys, tmp_path, http_server)
    port = tunnel.open()
    proc = psutil.Process(tunnel.pid)
    assert _accepts(port) and tunnel.alive
    tunnel.close()
    assert not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    assert not _accepts(port) and not tunnel.alive and _ssh_children() == []
    tunnel.close()  # idempotent
    with pytest.raises(TunnelError):
        tunnel.url
    assert tunnel.open() != 0 and tunnel.alive  # it can be opened again
    tunnel.close()


def test_a_late_sshd_is_waited_for(tmp_path, keys, tunnels, http_server):
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    ssh_port = port.getsockname()[1]
    port.close()  # nothing listens there yet: connection refused, as on a VM that is still booting
    server = SshServer(keys.public_key, port=ssh_port)
    timer = threading.Timer(1.5, server.start)
    timer.start()
    try:
        tunnel = tunnels("127.0.0.1", USER, keys.private_path, str(tmp_path / "record" / "known_hosts"),
                         remote_port=http_server, ssh_port=ssh_port, connect_timeout_s=15)
        started = time.monotonic()
        tunnel.open()
        assert time.monotonic() - started >= 1.0
        with urllib.request.urlopen(tunnel.url, timeout=5) as resp:
            assert resp.status == 200
        tunnel.close()
    finally:
        timer.join()
        server.stop()


def test_nothing_listening_times_out_in_one_line(tmp_path, keys, tunnels):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    ssh_port = s.getsockname()[1]
    s.close()
    tunnel = tunnels("127.0.0.1", USER, keys.private_path, str(tmp_path / "kh"), ssh_port=ssh_port,
                     connect_timeout_s=2)
    started = time.monotonic()
    with pytest.raises(TunnelError) as err:
        tunnel.open()
    assert 1.5 <= time.monotonic() - started < 8
    assert err.value.kind == "timeout" and "\n" not in str(err.value)
    assert "within 2 s" in str(err.value) and "Connection refused" in str(err.value)


def test_keys_arriving_late_are_retried_when_asked(tmp_path, keys, servers, tunnels, http_server):
    server = servers(keys.public_key, username="nobody-yet")  # the guest agent has not made the user yet
    threading.Timer(1.0, lambda: setattr(server, "username", USER)).start()
    tunnel = _tunnel(tunnels, server, keys, tmp_path, http_server, connect_timeout_s=10, auth_retry_s=8)
    tunnel.open()
    assert server.refused_auth and server.accepted_auth


def test_the_server_forwards_only_to_loopback(tmp_path, keys, servers, tunnels):
    server = servers(keys.public_key)
    tunnel = tunnels("127.0.0.1", USER, keys.private_path, str(tmp_path / "record" / "known_hosts"),
                     remote_host="10.11.12.13", remote_port=80, ssh_port=server.port)
    port = tunnel.open()  # the listener is up; the head refuses the channel itself
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.settimeout(5)
        assert conn.recv(1) == b""
    deadline = time.monotonic() + 5
    while "administratively prohibited" not in tunnel.last_ssh_message and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "administratively prohibited" in tunnel.last_ssh_message
    assert ("10.11.12.13", 80) in server.refused_forwards and server.forwarded == []


def test_paths_with_spaces_and_percent_signs(tmp_path, servers, tunnels, http_server):
    record = tmp_path / "runs" / "demo 100% done"  # ssh splits option values at spaces and expands %-tokens
    keys = ensure_keypair(str(record), USER)
    server = servers(keys.public_key)
    tunnel = tunnels("127.0.0.1", USER, keys.private_path, str(record / "known hosts"), remote_port=http_server,
                     ssh_port=server.port)
    tunnel.open()
    with urllib.request.urlopen(tunnel.url, timeout=5) as resp:
        assert resp.status == 200
    assert server.host_public_key in (record / "known hosts").read_text()
    with pytest.raises(ValueError):  # ssh expands ${VAR} in these paths, and there is no escaping it
        SshTunnel("127.0.0.1", USER, str(tmp_path / "${HOME}" / "ssh_key"), str(record / "kh"))
