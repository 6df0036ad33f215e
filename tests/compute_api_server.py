"""Test helper: a local, in-memory Compute Engine v1 REST API server (instances and zone operations).

Google ships no Compute Engine emulator, so this implements the slice of `compute.googleapis.com/compute/v1`
that `cluster.head_vm` drives through the real `google-cloud-compute` client (REST transport):

  POST   /compute/v1/projects/P/zones/Z/instances                 -> Operation (insert)
  GET    /compute/v1/projects/P/zones/Z/instances[/NAME]           (list / get)
  DELETE /compute/v1/projects/P/zones/Z/instances/NAME            -> Operation (delete)
  GET    /compute/v1/projects/P/zones/Z/operations/OP             (what `ExtendedOperation.done()` polls)
  POST   /compute/v1/projects/P/zones/Z/operations/OP/wait        (answers when done, or after ~2 s)

Bodies are JSON (camelCase), enums as names, int64s as strings. A missing resource gets a 404 with a
Google-style error body (`errors[].reason` = notFound), which the client raises as
`google.api_core.exceptions.NotFound`; a second insert of a name gets 409 (alreadyExists).

State machine (wall-clock, driven by a background ticker, `tick_s` seconds per step): an inserted
instance is PROVISIONING, STAGING one tick later and RUNNING the tick after; it gets
`networkInterfaces[0].networkIP` = 127.0.0.1 (and `natIP` = 127.0.0.1 on an access config, if it asked
for one) when it enters RUNNING, and `on_running(instance)` fires then. The insert operation is
RUNNING at first and DONE `op_ticks` ticks later (default 1, so the client polls it). A delete puts
the instance in STOPPING and removes it one tick later, calling `on_delete(instance)`; its
operation is DONE then. `stop(name)` makes an instance TERMINATED (as a preempted or stopped VM is),
and `fail_next_insert()` makes the next insert's operation end in an error (no instance appears), as
a zone without capacity does.
"""

from __future__ import annotations

import itertools
import json
import re
import time
from datetime import datetime, timezone
from typing import Callable, Optional

from fake_api import FakeApiError, FakeApiServer

InstanceCallback = Callable[[dict], None]
_BASE = "https://www.googleapis.com/compute/v1"
_NAME = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")
_LABEL_KEY, _LABEL_VALUE = re.compile(r"[a-z][-_a-z0-9]{0,62}"), re.compile(r"[-_a-z0-9]{0,63}")
_REASONS = {400: "invalid", 404: "notFound", 409: "alreadyExists"}


DEFAULT_SERVICE_ACCOUNT = "4242-compute@developer.gserviceaccount.com"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class ApiError(FakeApiError):
    """An error the handler turns into a Google-style JSON error response."""

    def __init__(self, code: int, message: str, reason: Optional[str] = None):
        super().__init__(message)
        self.code, self.message, self.reason = code, message, reason or _REASONS.get(code, "backendError")

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message,
                          "errors": [{"message": self.message, "domain": "global", "reason": self.reason}]}}


class ComputeApiServer(FakeApiServer):
    """The fake Compute Engine API: `start()` returns its base URL; also a context manager."""

    thread_name = "compute-api-server"

    def __init__(self, tick_s: float = 0.2, op_ticks: int = 1, on_running: Optional[InstanceCallback] = None,
                 on_delete: Optional[InstanceCallback] = None, ip: str = "127.0.0.1",
                 external_ip: Optional[str] = None, default_service_account: str = DEFAULT_SERVICE_ACCOUNT):
        super().__init__(tick_s)
        self.op_ticks, self.ip, self.external_ip = op_ticks, ip, external_ip or ip
        self.default_service_account = default_service_account
        self.on_running, self.on_delete = on_running, on_delete
        self.insert_bodies: list[dict] = []  # JSON bodies of instance inserts
        self.instances: dict[str, dict] = {}  # "projects/P/zones/Z/instances/NAME" -> record
        self.operations: dict[str, dict] = {}  # "projects/P/zones/Z/operations/OP" -> record
        self._ids = itertools.count(1000)
        self._fail_next: Optional[tuple[str, str]] = None

    def stop(self, name: Optional[str] = None) -> None:
        """Without a name: shut the server down. With one: the instance turns TERMINATED (see `terminate`)."""
        if name is not None:
            self.terminate(name)
            return
        self.shutdown()

    # test hooks ------------------------------------------------------------------------------
    def terminate(self, name: str, status: str = "TERMINATED") -> None:
        """Stop an instance (short name or full name) as preemption or `instances.stop` does: TERMINATED."""
        with self._lock:
            record = self._find(name)
            record["json"]["status"], record["timeline"] = status, []
            record["json"]["lastStopTimestamp"] = _now()

    def fail_next_insert(self, code: str = "ZONE_RESOURCE_POOL_EXHAUSTED",
                         message: str = "The zone does not have enough resources available to fulfill the request.",
                         ) -> None:
        """The next insert's operation ends in this error (HTTP 503 in the operation) and no instance appears."""
        with self._lock:
            self._fail_next = (code, message)

    def instance(self, name: str) -> dict:
        """A copy of an instance's JSON (short or full name)."""
        with self._lock:
            return json.loads(json.dumps(self._find(name)["json"]))

    def _find(self, name: str) -> dict:
        for full, record in self.instances.items():
            if full == name or full.rsplit("/", 1)[-1] == name:
                return record
        raise KeyError(f"no instance {name!r}")

    # state machine ---------------------------------------------------------------------------
    def advance(self) -> None:
        """Move every instance and operation along its timeline; run callbacks outside the lock."""
        events: list[tuple[Optional[InstanceCallback], dict]] = []
        now = time.monotonic()
        with self._lock:
            for full, record in list(self.instances.items()):
                if record.get("delete_at") is not None:
                    if now >= record["delete_at"]:
                        del self.instances[full]
                        events.append((self.on_delete, record["json"]))
                    continue
                while record["timeline"] and now >= record["timeline"][0][0]:
                    _, status = record["timeline"].pop(0)
                    record["json"]["status"] = status
                    if status == "RUNNING":
                        nic = record["json"]["networkInterfaces"][0]
                        nic["networkIP"] = self.ip
                        for config in nic.get("accessConfigs", []):
                            config["natIP"] = self.external_ip
                        record["json"]["lastStartTimestamp"] = _now()
                        events.append((self.on_running, record["json"]))
            for op in self.operations.values():
                if op["json"]["status"] != "DONE" and now >= op["done_at"]:
                    self._finish(op)
        for callback, instance in events:
            self._call(callback, json.loads(json.dumps(instance)))

    @staticmethod
    def _finish(op: dict) -> None:
        data = op["json"]
        data.update(status="DONE", progress=100, endTime=_now())
        if op.get("error"):
            code, message = op["error"]
            data["error"] = {"errors": [{"code": code, "message": message}]}
            data.update(httpErrorStatusCode=503, httpErrorMessage="SERVICE UNAVAILABLE")

    @staticmethod
    def _call(callback: Optional[InstanceCallback], instance: dict) -> None:
        if callback is None:
            return
        try:
            callback(instance)
        except Exception as exc:  # a test callback's failure must not kill the ticker
            print(f"compute_api_server: callback {callback!r} failed: {exc!r}")

    # API ---------------------------------------------------------------------------------------
    def error_body(self, code: int, message: str) -> dict:
        return ApiError(code, message).body()

    def respond(self, method: str, path: str, query: dict[str, str], body: dict) -> tuple[int, dict]:
        return 200, self.handle(method, path, body)

    def handle(self, method: str, path: str, body: dict) -> dict:
        project = re.fullmatch(r"/compute/v1/projects/([^/]+)", path)
        if project and method == "GET":  # projects.get: what the launcher reads is the default service account
            return {"kind": "compute#project", "name": project.group(1), "id": "4242",
                    "defaultServiceAccount": self.default_service_account}
        match = re.fullmatch(r"/compute/v1/(projects/[^/]+/zones/[^/]+)/(instances|operations)(?:/([^/]+))?(/wait)?",
                             path)
        if not match:
            raise ApiError(404, f"Method not found: {method} {path}")
        zone_path, collection, rid, wait = match.groups()
        name = f"{zone_path}/{collection}/{rid}"
        if collection == "operations" and rid is not None:
            if method == "POST" and wait:
                return self._wait_op(name)
            if method == "GET" and not wait:
                with self._lock:
                    return json.loads(json.dumps(self._op(name)["json"]))
        elif collection == "instances" and not wait:
            with self._lock:
                if method == "POST" and rid is None:
                    return self._insert(zone_path, body)
                if method == "GET" and rid is None:
                    items = [r["json"] for full, r in self.instances.items() if full.startswith(zone_path + "/")]
                    listing = {"kind": "compute#instanceList", "id": zone_path,
                               "selfLink": f"{_BASE}/{zone_path}/instances"}
                    return json.loads(json.dumps({**listing, "items": items} if items else listing))
                if method == "GET":
                    return json.loads(json.dumps(self._get(name)["json"]))
                if method == "DELETE":
                    return self._delete(zone_path, name)
        raise ApiError(404, f"Method not found: {method} {path}")

    def _get(self, name: str) -> dict:
        if name not in self.instances:
            raise ApiError(404, f"The resource '{name}' was not found")
        return self.instances[name]

    def _op(self, name: str) -> dict:
        if name not in self.operations:
            raise ApiError(404, f"The resource '{name}' was not found")
        return self.operations[name]

    def _wait_op(self, name: str) -> dict:
        deadline = time.monotonic() + 2.0
        while True:
            with self._lock:
                op = self._op(name)
                if op["json"]["status"] == "DONE" or time.monotonic() > deadline:
                    return json.loads(json.dumps(op["json"]))
            time.sleep(min(0.02, self.tick_s / 4))

    def _operation(self, zone_path: str, target: str, kind: str, delay_s: float,
                   error: Optional[tuple[str, str]] = None) -> dict:
        op_id = next(self._ids)
        name = f"operation-{int(time.time() * 1000)}-{op_id:x}"
        full = f"{zone_path}/operations/{name}"
        data = {"kind": "compute#operation", "id": str(op_id), "name": name, "zone": f"{_BASE}/{zone_path}",
                "operationType": kind, "targetLink": f"{_BASE}/{target}", "targetId": str(op_id + 1),
                "status": "RUNNING", "user": "launcher-tests@example.com", "progress": 0, "insertTime": _now(),
                "startTime": _now(), "selfLink": f"{_BASE}/{full}"}
        op = {"json": data, "done_at": time.monotonic() + delay_s, "error": error}
        self.operations[full] = op
        if delay_s <= 0:
            self._finish(op)
        return json.loads(json.dumps(data))

    def _insert(self, zone_path: str, body: dict) -> dict:
        self.insert_bodies.append(body)
        name = body.get("name", "")
        if not _NAME.fullmatch(name):
            raise ApiError(400, f"Invalid value for field 'resource.name': '{name}'.")
        full = f"{zone_path}/instances/{name}"
        if full in self.instances:
            raise ApiError(409, f"The resource '{full}' already exists")
        if not body.get("machineType"):
            raise ApiError(400, "Invalid value for field 'resource.machineType': ''. Machine type is required.")
        boot = [d for d in body.get("disks", []) if d.get("boot")]
        if len(boot) != 1 or not boot[0].get("initializeParams", {}).get("sourceImage"):
            raise ApiError(400, "Exactly one boot disk with initializeParams.sourceImage is required.")
        if not body.get("networkInterfaces"):
            raise ApiError(400, "At least one network interface is required.")
        for key, value in body.get("labels", {}).items():
            if not _LABEL_KEY.fullmatch(key) or not _LABEL_VALUE.fullmatch(value):
                raise ApiError(400, f"Invalid value for field 'resource.labels': '{key}={value}'.")
        items = body.get("metadata", {}).get("items", [])
        if sum(len(i.get("key", "")) + len(i.get("value", "")) for i in items) > 512 * 1024:
            raise ApiError(400, "Metadata is larger than 512 KB.")
        error, self._fail_next = self._fail_next, None
        op = self._operation(zone_path, full, "insert", self.op_ticks * self.tick_s, error)
        if error is not None:
            return op
        data = json.loads(json.dumps(body))
        nics = data["networkInterfaces"]
        for i, nic in enumerate(nics):
            nic.setdefault("name", f"nic{i}")
            nic.setdefault("kind", "compute#networkInterface")
            for config in nic.get("accessConfigs", []):
                config.setdefault("kind", "compute#accessConfig")
        machine_type = data["machineType"]
        if not machine_type.startswith("http"):  # zones/Z/machineTypes/T (or a bare T) -> full URL
            machine_type = f"{_BASE}/{zone_path}/machineTypes/{machine_type.rsplit('/', 1)[-1]}"
        data.update(kind="compute#instance", id=str(next(self._ids)), creationTimestamp=_now(),
                    status="PROVISIONING", zone=f"{_BASE}/{zone_path}", selfLink=f"{_BASE}/{full}",
                    machineType=machine_type)
        data.setdefault("metadata", {})["fingerprint"] = "ZmFrZQ=="
        data["labelFingerprint"] = "ZmFrZQ=="
        now = time.monotonic()
        self.instances[full] = {"json": data, "timeline": [(now + self.tick_s, "STAGING"),
                                                           (now + 2 * self.tick_s, "RUNNING")]}
        return op

    def _delete(self, zone_path: str, name: str) -> dict:
        record = self._get(name)
        if record.get("delete_at") is None:
            record["delete_at"] = time.monotonic() + self.tick_s
            record["timeline"] = []
            record["json"]["status"] = "STOPPING"
        delay = max(0.0, record["delete_at"] - time.monotonic())
        return self._operation(zone_path, name, "delete", delay)
