"""Test helper: a real SSH server on loopback (asyncssh), standing in for the Ray head VM's sshd.

It listens on 127.0.0.1 only, accepts public-key authentication with one authorized key (for any user name, or
only for a configured one), allows local port forwarding (direct-tcpip) only to 127.0.0.1/localhost, and
refuses everything else: passwords, keyboard-interactive, sessions (shell/exec), remote forwarding, agent and
X11 forwarding. It runs in a background thread with its own event loop and records what happened:

    server = SshServer(keypair.public_key)
    port = server.start()
    ...
    server.accepted_auth   # [(username, "SHA256:...")] per accepted login
    server.refused_auth    # [(username, "SHA256:...")] per refused key
    server.forwarded       # [(dest_host, dest_port)] per allowed forward
    server.refused_forwards
    server.stop()

The host key is generated afresh unless `host_key_path` is given, so a test can restart a server on the same
port with a different host key (what a re-created head VM looks like to a client that pinned the old one).
"""
import asyncio
import threading

import asyncssh

LOOPBACK_DESTINATIONS = ("127.0.0.1", "localhost")


def _key_blob(public_key) -> str:
    """The "type base64" part of an OpenSSH public key (text or SSHKey), without its comment."""
    if not isinstance(public_key, str):
        public_key = public_key.export_public_key("openssh").decode()
    return " ".join(public_key.split()[:2])


class SshServer:
    def __init__(self, authorized_public_key: str, host_key_path: str | None = None, port: int = 0,
                 username: str | None = None):
        self.authorized = _key_blob(asyncssh.import_public_key(authorized_public_key.strip()))
        if host_key_path:
            self.host_key = asyncssh.read_private_key(host_key_path)
        else:
            self.host_key = asyncssh.generate_private_key("ssh-ed25519")
        self.port = port
        self.username = username
        self.accepted_auth: list[tuple[str, str]] = []
        self.refused_auth: list[tuple[str, str]] = []
        self.forwarded: list[tuple[str, int]] = []
        self.refused_forwards: list[tuple[str, int]] = []
        self.sessions_refused = 0
        self._lock = threading.Lock()
        self._conns: set = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._acceptor = None

    @property
    def host_key_fingerprint(self) -> str:
        return self.host_key.get_fingerprint("sha256")

    @property
    def host_public_key(self) -> str:
        return _key_blob(self.host_key.convert_to_public())

    def _factory(self):
        owner = self

        class _Server(asyncssh.SSHServer):
            def __init__(self):
                self._conn = None
                self._user = ""
                self._fingerprint = ""

            def connection_made(self, conn):
                self._conn = conn
                with owner._lock:
                    owner._conns.add(conn)

            def connection_lost(self, exc):
                with owner._lock:
                    owner._conns.discard(self._conn)

            def begin_auth(self, username):
                return True  # authentication is always required

            def password_auth_supported(self):
                return False

            def kbdint_auth_supported(self):
                return False

            def public_key_auth_supported(self):
                return True

            def validate_public_key(self, username, key):
                fingerprint = key.get_fingerprint("sha256")
                ok = _key_blob(key) == owner.authorized and owner.username in (None, username)
                if ok:
                    self._user, self._fingerprint = username, fingerprint
                else:
                    with owner._lock:
                        owner.refused_auth.append((username, fingerprint))
                return ok

            def auth_completed(self):
                with owner._lock:
                    owner.accepted_auth.append((self._user, self._fingerprint))

            def session_requested(self):
                with owner._lock:
                    owner.sessions_refused += 1
                return False

            def connection_requested(self, dest_host, dest_port, orig_host, orig_port):
                with owner._lock:
                    if dest_host in LOOPBACK_DESTINATIONS:
                        owner.forwarded.append((dest_host, dest_port))
                        return True
                    owner.refused_forwards.append((dest_host, dest_port))
                raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                                                "only loopback destinations may be forwarded")

            def server_requested(self, listen_host, listen_port):
                return False

        return _Server()

    def start(self) -> int:
        """Start listening on 127.0.0.1 (self.port, or a free port); returns the port."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="ssh-server", daemon=True)
        self._thread.start()

        async def listen():
            return await asyncssh.listen(
                host="127.0.0.1", port=self.port, server_factory=self._factory,
                server_host_keys=[self.host_key], reuse_address=True,
                allow_pty=False, agent_forwarding=False, x11_forwarding=False, login_timeout=10)

        try:
            self._acceptor = asyncio.run_coroutine_threadsafe(listen(), self._loop).result(timeout=10)
        except BaseException:
            self._stop_loop()
            raise
        self.port = self._acceptor.get_port()
        return self.port

    def stop(self) -> None:
        """Stop listening and drop every open connection (idempotent)."""
        if self._loop is None:
            return

        async def shutdown():
            if self._acceptor is not None:
                self._acceptor.close()
                await self._acceptor.wait_closed()
            with self._lock:
                conns = list(self._conns)
            for conn in conns:
                conn.close()
            for conn in conns:
                try:
                    await asyncio.wait_for(conn.wait_closed(), 5)
                except (asyncio.TimeoutError, Exception):  # noqa: BLE001 - best effort on the way down
                    pass

        try:
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(timeout=10)
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        loop, self._loop = self._loop, None
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(timeout=10)
        loop.close()
        self._acceptor = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()
