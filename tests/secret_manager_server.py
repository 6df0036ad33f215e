"""Test helper: a local, in-memory Secret Manager v1 REST API server (secrets, versions, IAM policies).

Google ships no Secret Manager emulator, so this implements the slice of `secretmanager.googleapis.com/v1`
that `cluster.secrets` drives through the real `google-cloud-secret-manager` client (REST transport):

  POST   /v1/projects/P/secrets?secretId=ID                  (create: 409 ALREADY_EXISTS if present)
  GET    /v1/projects/P/secrets/S
  DELETE /v1/projects/P/secrets/S                            (all its versions and its policy go with it)
  POST   /v1/projects/P/secrets/S:addVersion                 {"payload": {"data": b64, "dataCrc32c": "N"}}
  GET    /v1/projects/P/secrets/S/versions/{N|latest}:access -> {"name", "payload": {"data", "dataCrc32c"}}
  POST   /v1/projects/P/secrets/S:setIamPolicy               (replaces the policy; a stale etag -> 409 ABORTED)
  GET    /v1/projects/P/secrets/S:getIamPolicy               (POST too, as older clients send it)

Bodies are protobuf JSON (camelCase, bytes as base64, int64s as strings). Errors carry Google's JSON error
shape (`{"error": {"code", "message", "status"}}`), which the client raises as NotFound (404), Conflict (409)
or Forbidden (403: PermissionDenied's REST face). Messages never echo a payload.

For tests: `bodies` holds every request as (method, request target with its query, raw body bytes), so a test
can assert a secret's value appeared in exactly the requests meant to carry it; `secrets` maps a secret's name
to its record (`json`, `versions`: list of payload bytes, `policy`); `policy(secret)` returns a copy of a
secret's IAM policy. `access_allowed(secret_name)` decides whether an access is answered or refused with 403
PERMISSION_DENIED: by default every access is allowed, unless `caller` is set to a service-account email, in
which case only a `roles/secretmanager.secretAccessor` member of the secret's policy may read it. Override it
(or assign `server.access_allowed = lambda name: ...`) to model IAM propagation delays.
"""

from __future__ import annotations

import base64
import copy
import io
import re
from datetime import datetime, timezone
from typing import Optional

from fake_api import FakeApiError, FakeApiServer

ACCESSOR_ROLE = "roles/secretmanager.secretAccessor"
_SECRET_ID = re.compile(r"[A-Za-z0-9_-]{1,255}")
_LABEL_KEY, _LABEL_VALUE = re.compile(r"[a-z][-_a-z0-9]{0,62}"), re.compile(r"[-_a-z0-9]{0,63}")
_MAX_PAYLOAD = 64 * 1024


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


class ApiError(FakeApiError):
    """An error the handler turns into a Google-style JSON error response."""

    STATUS = {400: "INVALID_ARGUMENT", 403: "PERMISSION_DENIED", 404: "NOT_FOUND", 409: "ALREADY_EXISTS",
              500: "INTERNAL"}

    def __init__(self, code: int, message: str, status: Optional[str] = None):
        super().__init__(message)
        self.code, self.message, self.status = code, message, status or self.STATUS.get(code, "UNKNOWN")

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message, "status": self.status}}


class SecretManagerServer(FakeApiServer):
    """The fake Secret Manager API: `start()` returns its base URL; also a context manager."""

    thread_name = "secret-manager-server"

    def __init__(self, tick_s: float = 1.0, caller: Optional[str] = None):
        super().__init__(tick_s)
        self.caller = caller  # a service-account email: access is then checked against the secret's policy
        self.bodies: list[tuple[str, str, bytes]] = []  # (method, path?query, raw body), in arrival order
        self.secrets: dict[str, dict] = {}  # "projects/P/secrets/S" -> {"json", "versions", "policy", "etag"}
        self.denied: list[str] = []  # secret names whose access was refused (403)
        self._etags = iter(range(1, 1 << 62))

    # lifecycle: also record raw bodies ---------------------------------------------------------
    def start(self) -> str:
        url = super().start()
        base = self._httpd.RequestHandlerClass
        api = self

        class RecordingHandler(base):  # type: ignore[misc,valid-type]
            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                api.bodies.append((self.command, self.path, raw))
                rfile, self.rfile = self.rfile, io.BytesIO(raw)  # the base handler reads the body again
                try:
                    super()._serve()
                finally:
                    self.rfile = rfile  # keep-alive: the next request comes on the real stream

            do_GET = do_POST = do_DELETE = do_PATCH = _serve  # the base binds these to its own _serve

        self._httpd.RequestHandlerClass = RecordingHandler  # read per connection; none has arrived yet
        return url

    # test hooks --------------------------------------------------------------------------------
    def access_allowed(self, secret_name: str) -> bool:
        """Whether an access to `secret_name` is answered (else 403 PERMISSION_DENIED)."""
        if self.caller is None:
            return True
        return f"serviceAccount:{self.caller}" in self.accessors(secret_name)

    def policy(self, secret: str) -> dict:
        """A copy of a secret's IAM policy (full name, or a short id if unique)."""
        with self._lock:
            return copy.deepcopy(self._find(secret)["policy"])

    def accessors(self, secret: str) -> list[str]:
        """The members holding secretAccessor on a secret, as its policy lists them."""
        with self._lock:
            policy = self._find(secret)["policy"]
            return [m for b in policy.get("bindings", []) if b.get("role") == ACCESSOR_ROLE
                    for m in b.get("members", [])]

    def payloads(self, secret: str) -> list[bytes]:
        """Every version's payload of a secret, oldest first."""
        with self._lock:
            return list(self._find(secret)["versions"])

    def mentions(self, needle: bytes) -> list[tuple[str, str]]:
        """(method, target) of every request whose target or raw body contains `needle` (also in base64)."""
        encoded = base64.b64encode(needle)
        out = []
        for method, target, raw in list(self.bodies):
            if needle in raw or encoded in raw or needle.decode(errors="replace") in target:
                out.append((method, target))
        return out

    def _find(self, secret: str) -> dict:
        if secret in self.secrets:
            return self.secrets[secret]
        matches = [r for name, r in self.secrets.items() if name.rsplit("/", 1)[-1] == secret]
        if len(matches) != 1:
            raise KeyError(f"no secret {secret!r}")
        return matches[0]

    def advance(self) -> None:  # nothing happens over time here
        pass

    # API ---------------------------------------------------------------------------------------
    def error_body(self, code: int, message: str) -> dict:
        return ApiError(code, message).body()

    def respond(self, method: str, path: str, query: dict[str, str], body: dict) -> tuple[int, dict]:
        match = re.fullmatch(r"/v1/(projects/[^/:]+)/secrets(?:/([^/:]+)(?:/versions/([^/:]+))?)?(?::(\w+))?",
                             path)
        if not match:
            raise ApiError(404, f"Method not found: {method} {path}")
        parent, sid, version, verb = match.groups()
        name = f"{parent}/secrets/{sid}"
        if sid is None:
            if method == "POST" and verb is None:
                return 200, self._create(parent, query.get("secretId", ""), body)
        elif version is not None:
            if method == "GET" and verb == "access":
                return 200, self._access(name, version)
        elif verb is None:
            if method == "GET":
                return 200, self._get_secret(name)
            if method == "DELETE":
                return 200, self._delete(name)
        elif verb == "addVersion" and method == "POST":
            return 200, self._add_version(name, body)
        elif verb == "setIamPolicy" and method == "POST":
            return 200, self._set_policy(name, body)
        elif verb == "getIamPolicy" and method in ("GET", "POST"):
            with self._lock:
                return 200, self._policy_json(self._get(name))
        raise ApiError(404, f"Method not found: {method} {path}")

    def _get(self, name: str) -> dict:
        if name not in self.secrets:
            raise ApiError(404, f"Secret [{name}] not found.")
        return self.secrets[name]

    def _create(self, parent: str, sid: str, body: dict) -> dict:
        if not _SECRET_ID.fullmatch(sid):
            raise ApiError(400, f"Invalid secret id: {sid!r}: ids are 1-255 of [A-Za-z0-9_-].")
        replication = body.get("replication") or {}
        if not ({"automatic", "userManaged"} & replication.keys()):
            raise ApiError(400, "Secret.replication is required.")
        labels = body.get("labels") or {}
        for key, value in labels.items():
            if not _LABEL_KEY.fullmatch(key) or not _LABEL_VALUE.fullmatch(str(value)):
                raise ApiError(400, f"Invalid label: {key!r}.")
        name = f"{parent}/secrets/{sid}"
        with self._lock:
            if name in self.secrets:
                raise ApiError(409, f"Secret [{name}] already exists.")
            record = {"json": {"name": name, "replication": replication, "createTime": _now(),
                               "etag": f'"{next(self._etags)}"', **({"labels": labels} if labels else {})},
                      "versions": [], "policy": {"version": 1, "etag": self._etag()}}
            self.secrets[name] = record
            return copy.deepcopy(record["json"])

    def _get_secret(self, name: str) -> dict:
        with self._lock:
            return copy.deepcopy(self._get(name)["json"])

    def _delete(self, name: str) -> dict:
        with self._lock:
            self._get(name)
            del self.secrets[name]
        return {}

    def _add_version(self, name: str, body: dict) -> dict:
        payload = body.get("payload") or {}
        try:
            data = base64.b64decode(payload.get("data", ""), validate=True)
        except ValueError:
            raise ApiError(400, "SecretPayload.data is not valid base64.") from None
        if len(data) > _MAX_PAYLOAD:
            raise ApiError(400, f"SecretPayload.data exceeds {_MAX_PAYLOAD} bytes.")
        if "dataCrc32c" in payload and int(payload["dataCrc32c"]) != crc32c(data):
            raise ApiError(400, "Checksum mismatch: SecretPayload.data_crc32c does not match the data.")
        with self._lock:
            record = self._get(name)
            record["versions"].append(data)
            return self._version_json(name, len(record["versions"]))

    @staticmethod
    def _version_json(name: str, number: int) -> dict:
        return {"name": f"{name}/versions/{number}", "createTime": _now(), "state": "ENABLED",
                "replicationStatus": {"automatic": {}}, "etag": f'"{number}"'}

    def _access(self, name: str, version: str) -> dict:
        with self._lock:
            record = self.secrets.get(name)
            versions = record["versions"] if record else []
            number = len(versions) if version == "latest" else int(version) if version.isdigit() else 0
            if not record or not 1 <= number <= len(versions):
                raise ApiError(404, f"Secret Version [{name}/versions/{version}] not found or has no versions.")
            data = versions[number - 1]
        if not self.access_allowed(name):
            self.denied.append(name)
            raise ApiError(403, f"Permission 'secretmanager.versions.access' denied for resource "
                                f"'{name}/versions/{version}' (or it may not exist).")
        return {"name": f"{name}/versions/{number}",
                "payload": {"data": base64.b64encode(data).decode(), "dataCrc32c": str(crc32c(data))}}

    def _etag(self) -> str:
        return base64.b64encode(f"etag-{next(self._etags)}".encode()).decode()

    @staticmethod
    def _policy_json(record: dict) -> dict:
        return copy.deepcopy(record["policy"])

    def _set_policy(self, name: str, body: dict) -> dict:
        policy = body.get("policy") or {}
        for binding in policy.get("bindings", []):
            if not str(binding.get("role", "")).startswith("roles/"):
                raise ApiError(400, f"Invalid role: {binding.get('role')!r}.")
            for member in binding.get("members", []):
                if not re.fullmatch(r"(user|serviceAccount|group|domain|principal\w*):\S+|allUsers|"
                                    r"allAuthenticatedUsers", member):
                    raise ApiError(400, f"Invalid member: {member!r}.")
        with self._lock:
            record = self._get(name)
            if policy.get("etag") and policy["etag"] != record["policy"]["etag"]:
                raise ApiError(409, "There were concurrent policy changes.", status="ABORTED")
            record["policy"] = {"version": int(policy.get("version") or 1), "etag": self._etag(),
                                **({"bindings": copy.deepcopy(policy["bindings"])} if policy.get("bindings")
                                   else {})}
            return self._policy_json(record)

