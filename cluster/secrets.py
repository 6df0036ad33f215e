"""The run's Ray auth token in Secret Manager: one secret per run, readable only by the run's service accounts.

The token never travels through instance metadata, startup scripts or logs. The launcher `put`s it (a new
version of `<tpu_name(run)>-ray-token`, automatic replication, labelled `launcher-run`) and replaces the
secret's IAM policy so that exactly the given service accounts hold `roles/secretmanager.secretAccessor`.
Each cloud VM (TPU VMs and the head VM) fetches it from its startup script, with its own default
credentials (the metadata server), once the project wheel is installed:

    python -m cluster.secrets fetch --project P --secret SECRET_ID --out PATH [--wait-s 300] [--endpoint URL]

which writes it to PATH with mode 0600 (atomically, never readable by others) and prints only where it went.
Everything goes through the official `google-cloud-secret-manager` client over REST; `endpoint`
(http://127.0.0.1:PORT) points it at a local server with anonymous credentials (tests).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from typing import Any, Callable, Optional, Sequence

from google.api_core import exceptions as gexc

from cluster.gcp import ProvisionError, rest_transport_args, tpu_name
from trainer.runfiles import EXIT_USER_ERROR

ACCESSOR_ROLE = "roles/secretmanager.secretAccessor"
_SECRET_ID = re.compile(r"[A-Za-z0-9_-]{1,255}")
_EMAIL = re.compile(r"[^@\s/:]+@[^@\s/:]+")
# What a VM's fetch waits out when asked to (--wait-s): the secret not created yet, IAM not yet propagated
# (over REST a 403 is `Forbidden`, the parent of PermissionDenied), a busy API, or no network yet at boot.
_RETRYABLE_API = (gexc.NotFound, gexc.Forbidden, gexc.TooManyRequests, gexc.ServiceUnavailable,
                  gexc.InternalServerError, gexc.GatewayTimeout, gexc.DeadlineExceeded)


def make_secret_client(endpoint: Optional[str] = None) -> Any:
    """A `secretmanager.SecretManagerServiceClient` over REST: default credentials, or anonymous ones against
    `endpoint` (tests). No credentials -> ProvisionError(CREDENTIALS_HINT)."""
    from google.cloud import secretmanager
    from google.cloud.secretmanager_v1.services.secret_manager_service.transports.rest import (
        SecretManagerServiceRestTransport,
    )

    return secretmanager.SecretManagerServiceClient(
        transport=SecretManagerServiceRestTransport(**rest_transport_args(endpoint)))


def secret_id(run_name: str) -> str:
    """The run's secret id: `<tpu_name(run)>-ray-token` ([a-z0-9-], <= 50 chars: a valid secret id)."""
    return f"{tpu_name(run_name)}-ray-token"


def crc32c(data: bytes) -> int:
    """CRC32C (Castagnoli) of `data`, as Secret Manager's `data_crc32c` carries it."""
    import google_crc32c  # google-cloud-storage's own dependency

    return int(google_crc32c.value(data))


def write_token_file(path: str, token: str) -> str:
    """Write `token` to `path` atomically, mode 0600 from the first byte: a temp file created O_EXCL with 0600
    in the same directory, fsynced, then `os.replace`d over `path`. A missing parent is created 0700."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        os.makedirs(parent, mode=0o700, exist_ok=True)
        os.chmod(parent, 0o700)  # makedirs' mode is masked by the umask
    tmp = os.path.join(parent, f".{os.path.basename(path)}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)  # exactly 0600, whatever the umask
            data = token.encode()
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename durable
        dir_fd = os.open(parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


def _scrub(text: str, token: Optional[str]) -> str:
    return text.replace(token, "<redacted>") if token else text


class RunSecret:
    """Creates, fills, restricts, reads and deletes a run's Ray-token secret in one project."""

    def __init__(self, project: str, client: Any = None, endpoint: Optional[str] = None,
                 progress: Callable[[str], None] = print):
        self.project, self.progress = project, progress
        self.client = client if client is not None else make_secret_client(endpoint)
        self.parent = f"projects/{project}"

    def name(self, run_name: str) -> str:
        """The secret's resource name: projects/P/secrets/<secret_id(run)>."""
        return f"{self.parent}/secrets/{secret_id(run_name)}"

    def _secret_name(self, run_name_or_secret_name: str) -> str:
        """A full name (projects/P/secrets/S[/versions/V]) is taken as is (less any version); else a run name."""
        if run_name_or_secret_name.startswith("projects/"):
            return run_name_or_secret_name.split("/versions/", 1)[0]
        return self.name(run_name_or_secret_name)

    def put(self, run_name: str, token: str, accessors: Sequence[str], labels: Optional[dict] = None) -> str:
        """Store `token` as the newest version of the run's secret (created if missing, with automatic
        replication and a `launcher-run` label), and replace its IAM policy with one binding: `accessors`
        (service-account emails) as secretAccessor, nobody else. Returns the secret's resource name."""
        if not token:
            raise ValueError("the Ray token is empty")
        members = sorted({f"serviceAccount:{_check_email(email)}" for email in accessors})
        if not members:
            raise ValueError("no service account to grant access to the Ray token")
        name = self.name(run_name)
        secret = {"replication": {"automatic": {}},
                  "labels": {**(labels or {}), "launcher-run": tpu_name(run_name)}}
        try:
            self.client.create_secret(request={"parent": self.parent, "secret_id": secret_id(run_name),
                                               "secret": secret})
            self.progress(f"[secrets] created secret {name}")
        except gexc.Conflict:  # over REST a 409 is `Conflict` (AlreadyExists is its gRPC-mapped child)
            self.progress(f"[secrets] reusing secret {name}")
        except gexc.GoogleAPICallError as exc:
            raise ProvisionError(f"could not create secret {name}: {exc.message}") from exc
        data = token.encode()
        try:
            version = self.client.add_secret_version(request={
                "parent": name, "payload": {"data": data, "data_crc32c": crc32c(data)}})
        except gexc.GoogleAPICallError as exc:  # no chaining: nothing about this request may reach a traceback
            raise ProvisionError(f"could not add a version to secret {name}: "
                                 f"{_scrub(str(exc.message), token)}") from None
        self._restrict(name, members)
        self.progress(f"[secrets] stored the Ray token as {version.name}; readable by {', '.join(members)}")
        return name

    def _restrict(self, name: str, members: list[str]) -> None:
        from google.iam.v1 import iam_policy_pb2, policy_pb2

        policy = policy_pb2.Policy(bindings=[policy_pb2.Binding(role=ACCESSOR_ROLE, members=members)])
        try:
            self.client.set_iam_policy(request=iam_policy_pb2.SetIamPolicyRequest(resource=name, policy=policy))
        except gexc.GoogleAPICallError as exc:
            raise ProvisionError(f"could not set the IAM policy of secret {name}: {exc.message}") from exc

    def access(self, run_name_or_secret_name: str) -> str:
        """The payload of the secret's latest version (a run name, or projects/P/secrets/S). Raises the
        client's errors as they come (over REST: NotFound, Forbidden, ...); ProvisionError if the payload
        fails its CRC32C check."""
        name = f"{self._secret_name(run_name_or_secret_name)}/versions/latest"
        response = self.client.access_secret_version(request={"name": name})
        data = response.payload.data
        if "data_crc32c" in response.payload and crc32c(data) != response.payload.data_crc32c:
            raise ProvisionError(f"the payload of {response.name or name} failed its CRC32C check (corrupted)")
        return data.decode()

    def exists(self, run_name: str) -> bool:
        """Whether the run's secret exists (its metadata only: the token is not read)."""
        try:
            self.client.get_secret(request={"name": self.name(run_name)})
        except gexc.NotFound:
            return False
        except gexc.GoogleAPICallError as exc:
            raise ProvisionError(f"could not read secret {self.name(run_name)}: {exc.message}") from exc
        return True

    def delete(self, run_name: str) -> bool:
        """Delete the run's secret (all its versions); a missing one is fine. True if one was deleted."""
        name = self.name(run_name)
        try:
            self.client.delete_secret(request={"name": name})
        except gexc.NotFound:
            return False
        except gexc.GoogleAPICallError as exc:
            raise ProvisionError(f"could not delete secret {name}: {exc.message}") from exc
        self.progress(f"[secrets] deleted secret {name}")
        return True


def _check_email(email: str) -> str:
    email = email.strip()
    if email.startswith("serviceAccount:"):
        email = email[len("serviceAccount:"):]
    if not _EMAIL.fullmatch(email):
        raise ValueError(f"not a service-account email: {email!r}")
    return email


# CLI (runs on the cloud VMs) ---------------------------------------------------------------------------
def fetch(project: str, secret: str, out: str, endpoint: Optional[str] = None, wait_s: float = 0.0,
          poll_s: float = 5.0) -> str:
    """Write the latest version of secret `secret` (an id, or projects/P/secrets/S) to `out`, mode 0600.
    With `wait_s`, a missing secret, a denied access (IAM not yet propagated) or a transient error is
    retried every `poll_s` seconds for that long."""
    name = secret if secret.startswith("projects/") else f"projects/{project}/secrets/{secret}"
    if not secret.startswith("projects/") and not _SECRET_ID.fullmatch(secret):
        raise ValueError(f"not a valid secret id: {secret!r}")
    from google.auth.exceptions import TransportError
    from requests.exceptions import ConnectionError as RequestsConnectionError

    retryable = (*_RETRYABLE_API, TransportError, RequestsConnectionError)
    store = RunSecret(project, endpoint=endpoint, progress=lambda _line: None)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            token = store.access(name)
            break
        except retryable:
            if time.monotonic() + poll_s > deadline:
                raise
            time.sleep(poll_s)
    return write_token_file(out, token)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.secrets",
                                     description="Fetch the run's Ray token from Secret Manager (cloud VMs).")
    sub = parser.add_subparsers(dest="command", required=True)
    fetch_p = sub.add_parser("fetch", help="write the latest version of a secret to a 0600 file")
    fetch_p.add_argument("--project", required=True)
    fetch_p.add_argument("--secret", required=True, help="secret id (or projects/P/secrets/S)")
    fetch_p.add_argument("--out", required=True, help="file to write (mode 0600; parent created 0700)")
    fetch_p.add_argument("--endpoint", default=None, help="Secret Manager API endpoint override (tests)")
    fetch_p.add_argument("--wait-s", type=float, default=0.0,
                         help="retry a missing/denied/unavailable secret for this long (IAM propagation)")
    fetch_p.add_argument("--poll-s", type=float, default=5.0)
    args = parser.parse_args(argv)
    try:
        fetch(args.project, args.secret, args.out, endpoint=args.endpoint, wait_s=args.wait_s,
                     poll_s=args.poll_s)
    except Exception as exc:  # one line, never a traceback (which could show locals) and never the token
        reason = getattr(exc, "message", None) or str(exc) or type(exc).__name__
        reason = " ".join(f"{type(exc).__name__}: {reason}".split())
        print(f"[secrets] could not fetch secret {args.secret} (project {args.project}): {reason}",
              file=sys.stderr)
        return EXIT_USER_ERROR
    print(f"[secrets] wrote the Ray token to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
