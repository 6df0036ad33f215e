"""SSH tunnel from the laptop to the Ray head VM's job server (127.0.0.1:8265 on the head), with a per-run key.

The head's dashboard listens on its own loopback only; the launcher reaches it through `ssh -N -L` (the OpenSSH
client binary, run as a subprocess) to the head's port 22:

    keys = ensure_keypair(record_dir, user)            # record_dir/ssh_key (0600) + ssh_key.pub, made once
    metadata["ssh-keys"] = keys.metadata_value(user)   # "user:ssh-ed25519 AAAA... user" on the head VM
    with SshTunnel(head_ip, user, keys.private_path, os.path.join(record_dir, "known_hosts")) as tunnel:
        JobSubmissionClient(tunnel.url)                # http://127.0.0.1:<free local port>

The local end of the forward is bound on 127.0.0.1 only. The head's host key is pinned on first use
(StrictHostKeyChecking=accept-new into the run's own known_hosts, 0600): a later connection to a head presenting
another key fails with a TunnelError saying so. The user's ssh config, agent and known_hosts are not used.
Every failure is one TunnelError line built from ssh's one telling stderr line; nothing else of ssh's output
is shown.
"""
import atexit
import math
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from collections import deque
from dataclasses import dataclass

KEY_NAME = "ssh_key"
# GCE accepts lowercase letters, digits, '_', '.', '-' in user names; anything else (':' or a newline above
# all) could smuggle another entry into the ssh-keys metadata or an option into ssh's command line.
_USER_RE = re.compile(r"^[a-z_][a-z0-9._-]{0,31}$")
_HOST_RE = re.compile(r"^[A-Za-z0-9_.:%\[\]-]+$")


class TunnelError(RuntimeError):
    """The tunnel could not be opened (or the key pair made). One line; `kind` says which failure it was:
    "host_key", "auth", "timeout", "resolve", "key", "ssh_missing" or "ssh"."""

    def __init__(self, message: str, kind: str = "ssh"):
        super().__init__(_one_line(message, 600))
        self.kind = kind


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_user(user: str) -> None:
    if not isinstance(user, str) or not _USER_RE.match(user):
        raise ValueError(f"SSH user {user!r} is not a valid user name (lowercase letters, digits, '_', '.', '-'; "
                         "starting with a letter or '_')")


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise TunnelError(f"the OpenSSH client's {name} was not found on PATH; install the OpenSSH client "
                          "(openssh-client)", kind="ssh_missing")
    return path


@dataclass(frozen=True)
class KeyPair:
    """The run's SSH key pair: the private key file (0600) and the one-line OpenSSH public key."""

    private_path: str
    public_key: str

    @property
    def public_path(self) -> str:
        return self.private_path + ".pub"

    def metadata_value(self, user: str) -> str:
        """The GCE `ssh-keys` metadata line for this key: "user:ssh-ed25519 AAAA... user"."""
        _check_user(user)
        key_type, blob = self.public_key.split()[:2]
        return f"{user}:{key_type} {blob} {user}"


def ensure_keypair(record_dir: str, user: str) -> KeyPair:
    """The run's key pair in `record_dir` (created 0700 if missing): generated with ssh-keygen the first time,
    reused afterwards. The private key is (re)set to 0600; a missing public half is derived from the private."""
    _check_user(user)
    record_dir = os.path.abspath(record_dir)
    if not os.path.isdir(record_dir):
        os.makedirs(record_dir, mode=0o700, exist_ok=True)
        os.chmod(record_dir, 0o700)
    private = os.path.join(record_dir, KEY_NAME)
    public = private + ".pub"
    if not os.path.exists(private):
        _generate(private, user)
    os.chmod(private, 0o600)
    if not os.path.exists(public):
        _derive_public(private, public)
    with open(public) as f:
        public_key = f.read().strip()
    if len(public_key.split()) < 2 or "\n" in public_key:
        raise TunnelError(f"{public} is not a one-line OpenSSH public key; remove {private} and {public} "
                          "to make a new key pair", kind="key")
    return KeyPair(private_path=private, public_key=public_key)


def _generate(private: str, user: str) -> None:
    """ssh-keygen into a temporary name, then rename (public first): a crash never leaves a torn private key
    under the real name, and a public half without its private one is replaced."""
    keygen = _binary("ssh-keygen")
    tmp = f"{private}.tmp-{os.getpid()}"
    for path in (tmp, tmp + ".pub"):
        if os.path.exists(path):
            os.remove(path)
    result = subprocess.run([keygen, "-t", "ed25519", "-N", "", "-C", user, "-f", tmp, "-q"],
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    if result.returncode != 0 or not os.path.exists(tmp) or not os.path.exists(tmp + ".pub"):
        raise TunnelError(f"ssh-keygen could not make the run's key pair in {os.path.dirname(private)}: "
                          f"{_last_line(result.stderr) or f'exit code {result.returncode}'}", kind="key")
    os.chmod(tmp, 0o600)
    os.replace(tmp + ".pub", private + ".pub")
    os.replace(tmp, private)


def _derive_public(private: str, public: str) -> None:
    result = subprocess.run([_binary("ssh-keygen"), "-y", "-f", private], stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=60)
    if result.returncode != 0 or not result.stdout.strip():
        raise TunnelError(f"cannot read the run's private key {private} ({_last_line(result.stderr)}); remove "
                          "it to make a new key pair", kind="key")
    tmp = f"{public}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(result.stdout.strip() + "\n")
    os.replace(tmp, public)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return _one_line(lines[-1]) if lines else ""


def _free_local_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_ssh_path(path: str) -> str:
    """ssh expands %-tokens (escaped here) and ${VAR} (no escape exists) in these paths and splits config
    values at spaces (quoted here): refuse what cannot be passed through."""
    if '"' in path or "\n" in path or "${" in path:
        raise ValueError(f"path {path!r} cannot be passed to ssh (it holds a quote, a newline or '${{')")
    return path


def _ssh_path_arg(path: str) -> str:
    """A path as ssh's config parser takes it: '%' escaped (ssh expands %-tokens), quoted (spaces)."""
    return '"' + _check_ssh_path(path).replace("%", "%%") + '"'


def _ensure_private_file(path: str) -> None:
    parent = os.path.dirname(path)
    if parent and not os.path.isdir(parent):
        os.makedirs(parent, mode=0o700, exist_ok=True)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
    os.chmod(path, 0o600)


# ssh's stderr lines that say nothing about a failure
_NOISE = ("Warning: Permanently added", "channel ", "debug")
_RETRY_TRANSIENT = ("Connection refused", "Connection reset", "Connection closed by", "kex_exchange_identification",
                    "No route to host", "Network is unreachable", "Host is unreachable")


def _diagnose(lines: list[str]) -> tuple[str, str]:
    """(kind, telling line) from ssh's stderr of a failed start."""
    lines = [line.strip() for line in lines if line.strip()]
    text = "\n".join(lines)
    if ("REMOTE HOST IDENTIFICATION HAS CHANGED" in text or "Host key verification failed" in text
            or "has changed and you have requested strict checking" in text):
        key = ""
        for i, line in enumerate(lines):
            m = re.search(r"fingerprint for the (\S+) key sent by the remote host is", line)
            if m and i + 1 < len(lines):
                key = f"{m.group(1)} key {lines[i + 1].rstrip('.')}"
        return "host_key", key
    for marker, kind in (("Address already in use", "bind"), ("Could not request local forwarding", "bind"),
                         ("cannot listen to port", "bind"), ("Load key", "key"), ("no such identity", "key"),
                         ("not accessible", "key"), ("Permission denied", "auth"),
                         ("Could not resolve hostname", "resolve"), ("timed out", "timeout")):
        for line in lines:
            if marker in line:
                return kind, _one_line(line)
    for line in lines:
        if any(marker in line for marker in _RETRY_TRANSIENT):
            return "transient", _one_line(line)
    telling = [line for line in lines if not line.startswith(_NOISE) and not line.startswith("@")]
    return "ssh", _one_line(telling[-1]) if telling else ""


_live: "set[SshTunnel]" = set()  # tunnels whose ssh runs: held (not weakly) so that exit can still close them


@atexit.register
def _close_all() -> None:
    for tunnel in list(_live):
        tunnel.close()


class SshTunnel:
    """`ssh -N -L 127.0.0.1:<free port>:<remote_host>:<remote_port>` to `user@host`, as a context manager.

    open() returns the local port once ssh is authenticated and its forward listens (ExitOnForwardFailure), or
    raises TunnelError. A refused TCP connection (a fresh VM whose sshd is not up yet) is retried until
    connect_timeout_s is spent; with auth_retry_s > 0 a refused key is retried that long too (a fresh GCE VM's
    guest agent installs the ssh-keys metadata only after sshd is up). ssh runs in its own session, so a
    Ctrl-C meant for the launcher does not cut the tunnel it may still need; close() (or the interpreter's
    exit) ends it.
    """

    def __init__(self, host: str, user: str, key_path: str, known_hosts_path: str, remote_host: str = "127.0.0.1",
                 remote_port: int = 8265, ssh_port: int = 22, connect_timeout_s: float = 30,
                 auth_retry_s: float = 0.0):
        _check_user(user)
        for name, value in (("host", host), ("remote_host", remote_host)):
            if not isinstance(value, str) or not _HOST_RE.match(value) or value.startswith("-"):
                raise ValueError(f"SSH tunnel {name} {value!r} is not a host name or IP address")
        self.host, self.user = host, user
        self.key_path = _check_ssh_path(os.path.abspath(key_path))
        self.known_hosts_path = _check_ssh_path(os.path.abspath(known_hosts_path))
        self.remote_host, self.remote_port, self.ssh_port = remote_host, int(remote_port), int(ssh_port)
        self.connect_timeout_s = float(connect_timeout_s)
        self.auth_retry_s = float(auth_retry_s)
        self._proc: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None
        self._stderr: deque[str] = deque(maxlen=200)
        self._local_port: int | None = None
        self._lock = threading.RLock()  # close() may come from a signal handler while open() waits

    # ------------------------------------------------------------------ public
    @property
    def local_port(self) -> int | None:
        return self._local_port

    @property
    def url(self) -> str:
        if self._local_port is None:
            raise TunnelError("the SSH tunnel is not open (call open() first)")
        return f"http://127.0.0.1:{self._local_port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def alive(self) -> bool:
        """Whether ssh is still running (it exits when the head stops answering keepalives)."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def last_ssh_message(self) -> str:
        """ssh's latest telling stderr line (e.g. why a forwarded connection was refused), or ""."""
        lines = [line for line in list(self._stderr) if line.strip() and not line.startswith(_NOISE[0])]
        return _one_line(lines[-1]) if lines else ""

    def open(self) -> int:
        with self._lock:
            if self.alive and self._local_port is not None:
                return self._local_port
            self._stop_process()
            try:
                return self._open()
            except BaseException:  # a TunnelError, or Ctrl-C while waiting: never leave an ssh behind
                self._stop_process()
                self._local_port = None
                raise

    def close(self) -> None:
        with self._lock:
            self._stop_process()
            self._local_port = None

    def __enter__(self) -> "SshTunnel":
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = f"127.0.0.1:{self._local_port}" if self.alive else "closed"
        return (f"SshTunnel({self.user}@{self.host}:{self.ssh_port} -> {self.remote_host}:{self.remote_port}, "
                f"{state})")

    # ----------------------------------------------------------------- private
    @property
    def _target(self) -> str:
        return f"{self.user}@{self.host}:{self.ssh_port}"

    def _command(self, ssh: str, local_port: int, connect_timeout: int) -> list[str]:
        remote = f"[{self.remote_host}]" if ":" in self.remote_host else self.remote_host
        options = {
            # IdentityFile rather than -i: ssh checks an -i path before expanding %-tokens in it
            "IdentityFile": _ssh_path_arg(self.key_path), "IdentitiesOnly": "yes", "IdentityAgent": "none",
            "PreferredAuthentications": "publickey",
            "UserKnownHostsFile": _ssh_path_arg(self.known_hosts_path), "GlobalKnownHostsFile": "/dev/null",
            "StrictHostKeyChecking": "accept-new", "UpdateHostKeys": "no", "CheckHostIP": "no",
            "HashKnownHosts": "no", "ExitOnForwardFailure": "yes", "ServerAliveInterval": "15",
            "ServerAliveCountMax": "3", "BatchMode": "yes", "ConnectTimeout": str(connect_timeout),
            "ControlMaster": "no", "ControlPath": "none", "ForwardAgent": "no", "ForwardX11": "no",
            "RequestTTY": "no", "PermitLocalCommand": "no",
        }
        cmd = [ssh, "-N", "-F", "/dev/null",
               "-L", f"127.0.0.1:{local_port}:{remote}:{self.remote_port}",
               "-p", str(self.ssh_port)]
        for key, value in options.items():
            cmd += ["-o", f"{key}={value}"]
        return [*cmd, f"{self.user}@{self.host}"]

    def _start(self, ssh: str, local_port: int, connect_timeout: int) -> None:
        self._stderr = deque(maxlen=200)
        self._proc = subprocess.Popen(self._command(ssh, local_port, connect_timeout), stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        stderr, sink = self._proc.stderr, self._stderr

        def drain():  # keeps ssh from blocking on a full pipe; keeps the last lines for the diagnosis
            for raw in iter(stderr.readline, b""):
                sink.append(raw.decode("utf-8", "replace").rstrip("\r\n"))
            stderr.close()

        self._reader = threading.Thread(target=drain, name="ssh-tunnel-stderr", daemon=True)
        self._reader.start()
        _live.add(self)

    def _stop_process(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
        if self._reader is not None:
            self._reader.join(timeout=2)
            self._reader = None
        _live.discard(self)

    def _listening(self, proc: subprocess.Popen, local_port: int) -> bool:
        """Whether ssh's forward accepts connections on 127.0.0.1:local_port (and the listener is ssh's own,
        not another process that took the port in between, where psutil can tell)."""
        try:
            with socket.create_connection(("127.0.0.1", local_port), timeout=1):
                pass
        except OSError:
            return False
        try:
            import psutil

            conns = psutil.Process(proc.pid).net_connections(kind="tcp")
            return any(c.status == psutil.CONN_LISTEN and tuple(c.laddr)[:2] == ("127.0.0.1", local_port)
                       for c in conns)
        except Exception:  # noqa: BLE001 - psutil missing or not allowed to look: the connect has to do
            return True

    def _open(self) -> int:
        ssh = _binary("ssh")
        _ensure_private_file(self.known_hosts_path)
        start = time.monotonic()
        deadline = start + self.connect_timeout_s
        auth_deadline = start + min(self.auth_retry_s, self.connect_timeout_s)
        delay, bind_failures, last = 0.25, 0, ""
        while True:
            local_port = _free_local_port()
            connect_timeout = max(1, math.ceil(deadline - time.monotonic()))
            self._start(ssh, local_port, connect_timeout)
            # ConnectTimeout bounds the TCP connect and the banner; this bounds key exchange and auth as well
            attempt_deadline = max(deadline, time.monotonic() + connect_timeout) + 5
            proc = self._proc
            while proc.poll() is None and time.monotonic() < attempt_deadline:
                if self._listening(proc, local_port):
                    self._local_port = local_port
                    os.chmod(self.known_hosts_path, 0o600)
                    return local_port
                time.sleep(0.05)
                if self._proc is not proc:
                    raise TunnelError(f"the SSH tunnel to {self._target} was closed while it was being opened")
            timed_out = proc.poll() is None
            code = proc.returncode
            self._stop_process()
            kind, line = _diagnose(list(self._stderr))
            if timed_out:
                kind, line = "timeout", line or "no answer"
            last = line or last or (f"ssh exited with code {code}" if code is not None else "")
            now = time.monotonic()
            if kind == "bind" and bind_failures < 5:  # another process took the free port first: pick another
                bind_failures += 1
                continue
            retry = kind == "transient" or (kind == "auth" and now + delay < auth_deadline)
            if retry and now + delay < deadline:
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            raise self._error(kind, last)

    def _error(self, kind: str, line: str) -> TunnelError:
        if kind == "host_key":
            presents = f" ({self.host}:{self.ssh_port} now presents {line})" if line else ""
            return TunnelError(
                f"the head's SSH host key changed since it was pinned in {self.known_hosts_path}{presents}; if the "
                "head VM was re-created, remove that file (otherwise something is intercepting the connection)",
                kind="host_key")
        if kind == "auth":
            return TunnelError(
                f"the head's SSH server at {self.host}:{self.ssh_port} refused the run's key {self.key_path} for "
                f"user {self.user!r} ({line}); the head VM's ssh-keys metadata must hold that key for that user",
                kind="auth")
        if kind in ("timeout", "transient"):
            return TunnelError(f"could not open an SSH connection to {self._target} within "
                               f"{self.connect_timeout_s:g} s ({line})", kind="timeout")
        if kind == "resolve":
            return TunnelError(f"cannot resolve the head's address {self.host!r} ({line})", kind="resolve")
        if kind == "key":
            return TunnelError(f"ssh cannot use the run's private key {self.key_path} ({line})", kind="key")
        if kind == "bind":
            return TunnelError(f"ssh could not listen on a local port for the tunnel ({line})", kind="ssh")
        return TunnelError(f"ssh to {self._target} failed: {line or 'no message'}", kind="ssh")
