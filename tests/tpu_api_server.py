"""Test helper: a local, in-memory Cloud TPU v2 REST API server (queued resources, nodes, operations).

Google ships no TPU emulator, so this implements the slice of `tpu.googleapis.com/v2` that
`cluster.gcp` drives through the real `google-cloud-tpu` client (REST transport):

  POST   /v2/projects/P/locations/Z/queuedResources?queuedResourceId=ID   -> Operation
  GET    /v2/projects/P/locations/Z/queuedResources[/ID]
  DELETE /v2/projects/P/locations/Z/queuedResources/ID[?force=true]        -> Operation
  GET    /v2/projects/P/locations/Z/nodes[/ID]
  DELETE /v2/projects/P/locations/Z/nodes/ID                               -> Operation
  GET    /v2/projects/P/locations/Z/operations/OP

Bodies are protobuf JSON (camelCase); enums are sent as names. Missing resources get a 404 with a
Google-style error body, which the client raises as `google.api_core.exceptions.NotFound`.

State machine (wall-clock, driven by a background ticker, `tick_s` seconds per step): a created
queued resource walks through `qr_states` (default ACCEPTED -> WAITING_FOR_RESOURCES -> PROVISIONING
-> ACTIVE). Its nodes (one per slice: `nodeId`, or `<nodeIdPrefix or qr id>-<i>` for multislice)
appear as CREATING when it enters PROVISIONING and turn READY, with one `networkEndpoints` entry per
host (127.0.0.1:8470), when it enters ACTIVE; `on_ready(node)` fires once per node then. (tests/tpu_vm.py's
`BootedHosts` takes these callbacks: it boots the node's hosts by running its metadata's `startup-script`, and
kills them on delete or, wired to `on_preempt`, on preemption.)
The create operation is done `create_op_ticks` ticks after the request (default 0: at once).
A delete (force=true needed while nodes exist, as in the real API) puts the resource and its nodes
in DELETING and removes them one tick later, calling `on_delete(node)`; its operation is done then.

Preemption, as GCP does it for Spot/preemptible capacity: `preempt(node)` marks the node PREEMPTED
(it stays listed and keeps holding quota until deleted) and, with `suspend_on_preempt=True`
(default), moves the queued resource to SUSPENDING and one tick later to SUSPENDED (state initiator
SERVICE). With `suspend_on_preempt=False` the queued resource stays ACTIVE while its node is
PREEMPTED, which GCP also shows at times. `set_node_state(node, "TERMINATED")` forces any other state.
"""

from __future__ import annotations

import itertools
import json
import re
import time
from datetime import datetime, timezone
from typing import Any, Callable, Optional

from fake_api import FakeApiError, FakeApiServer

NodeCallback = Callable[[dict], None]
_OP_METADATA = "type.googleapis.com/google.cloud.tpu.v2.OperationMetadata"
_QR_TYPE = "type.googleapis.com/google.cloud.tpu.v2.QueuedResource"
_EMPTY_TYPE = "type.googleapis.com/google.protobuf.Empty"
_FALLBACK_HOSTS = {"v4-8": 1, "v4-16": 2, "v4-32": 4, "v4-64": 8, "v5p-8": 1, "v5p-32": 4, "v5p-128": 16,
                   "v5litepod-8": 1, "v5litepod-16": 4, "v5litepod-256": 64,
                   "v6e-8": 1, "v6e-16": 4, "v6e-32": 8, "v6e-256": 64}


def default_hosts_for(accelerator_type: str) -> int:
    """Hosts (TPU VMs) of one slice: from `cluster.catalog` when it is importable, else a small table."""
    try:
        from cluster.catalog import lookup  # written concurrently; optional here
    except ImportError:
        return _FALLBACK_HOSTS[accelerator_type]
    return int(lookup(accelerator_type).hosts)


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class ApiError(FakeApiError):
    """An error the handler turns into a Google-style JSON error response."""

    STATUS = {400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 409: "ALREADY_EXISTS", 500: "INTERNAL"}

    def __init__(self, code: int, message: str, status: Optional[str] = None):
        super().__init__(message)
        self.code, self.message, self.status = code, message, status or self.STATUS.get(code, "UNKNOWN")

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message, "status": self.status}}


class TpuApiServer(FakeApiServer):
    """The fake Cloud TPU API: `start()` returns its base URL; also a context manager."""

    thread_name = "tpu-api-server"

    def __init__(self, tick_s: float = 0.2, hosts_for: Callable[[str], int] = default_hosts_for,
                 qr_states: tuple[str, ...] = ("ACCEPTED", "WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"),
                 create_op_ticks: int = 0, suspend_on_preempt: bool = True,
                 on_ready: Optional[NodeCallback] = None, on_delete: Optional[NodeCallback] = None,
                 on_preempt: Optional[NodeCallback] = None):
        assert qr_states and qr_states[-1] == "ACTIVE" and "PROVISIONING" in qr_states
        super().__init__(tick_s)
        self.hosts_for, self.qr_states = hosts_for, qr_states
        self.create_op_ticks, self.suspend_on_preempt = create_op_ticks, suspend_on_preempt
        self.on_ready, self.on_delete, self.on_preempt = on_ready, on_delete, on_preempt
        self.create_bodies: list[dict] = []  # JSON bodies of queued-resource creates
        self.queued_resources: dict[str, dict] = {}  # full name -> record
        self.nodes: dict[str, dict] = {}  # full name -> node JSON
        self.operations: dict[str, dict] = {}  # full name -> record
        self._ids = itertools.count(1)
        self._fail_next: Optional[tuple[str, str]] = None

    def stop(self) -> None:
        self.shutdown()

    # test hooks ------------------------------------------------------------------------------
    def fail_next_create(self, state: str = "FAILED", message: str = "There is no more capacity in the zone") -> None:
        """The next created queued resource goes from its first state to `state` instead of provisioning."""
        with self._lock:
            self._fail_next = (state, message)

    def preempt(self, node: str) -> None:
        """Preempt a node (short id or full name): PREEMPTED; its queued resource suspends (see module doc)."""
        with self._lock:
            data = self._node(node)
            data["state"] = "PREEMPTED"
            qr = self.queued_resources.get(data.get("queuedResource", ""))
            if qr is not None and self.suspend_on_preempt and qr["state"] == "ACTIVE":
                self._set_qr_state(qr, "SUSPENDING", initiator="SERVICE")
                qr["suspend_at"] = time.monotonic() + self.tick_s
            snapshot = json.loads(json.dumps(data))
        self._call(self.on_preempt, snapshot)

    def set_node_state(self, node: str, state: str) -> None:
        """Force a node's state (e.g. TERMINATED, STOPPED), leaving its queued resource as it is."""
        with self._lock:
            self._node(node)["state"] = state

    # state machine ---------------------------------------------------------------------------
    def advance(self) -> None:
        """Move every resource along its timeline; run callbacks outside the lock."""
        events: list[tuple[Optional[NodeCallback], dict]] = []
        now = time.monotonic()
        with self._lock:
            for name, qr in list(self.queued_resources.items()):
                if qr.get("delete_at") is not None:
                    if now >= qr["delete_at"]:
                        del self.queued_resources[name]
                        for node_name in qr["node_names"]:
                            node = self.nodes.pop(node_name, None)
                            if node is not None:
                                events.append((self.on_delete, node))
                    continue
                if qr.get("suspend_at") is not None and now >= qr["suspend_at"]:
                    qr["suspend_at"] = None
                    self._set_qr_state(qr, "SUSPENDED", initiator="SERVICE")
                if qr["timeline"] and now >= qr["timeline"][0][0]:
                    _, state = qr["timeline"].pop(0)
                    events.extend(self._enter(qr, state))
            for name, node in list(self.nodes.items()):
                if node.get("_delete_at") is not None and now >= node["_delete_at"]:
                    del self.nodes[name]
                    events.append((self.on_delete, node))
            for op in self.operations.values():
                if not op["json"]["done"] and now >= op["done_at"]:
                    op["json"]["done"] = True
                    op["json"]["response"] = op["response"]() if callable(op["response"]) else op["response"]
        for callback, node in events:
            self._call(callback, {k: v for k, v in node.items() if not k.startswith("_")})

    def _enter(self, qr: dict, state: str) -> list[tuple[Optional[NodeCallback], dict]]:
        events: list[tuple[Optional[NodeCallback], dict]] = []
        if qr.get("fail") and state == "PROVISIONING":
            fail_state, message = qr["fail"]
            qr["timeline"].clear()
            self._set_qr_state(qr, fail_state)
            if fail_state == "FAILED":
                qr["json"]["state"]["failedData"] = {"error": {"code": 8, "message": message}}
            return events
        self._set_qr_state(qr, state)
        if state == "PROVISIONING":
            for node_name, node in zip(qr["node_names"], qr["node_templates"]):
                self.nodes[node_name] = node
        if state == "ACTIVE":
            for node_name in qr["node_names"]:
                node = self.nodes.get(node_name)
                if node is not None and node["state"] == "CREATING":
                    node["state"], node["health"] = "READY", "HEALTHY"
                    node["networkEndpoints"] = [{"ipAddress": "127.0.0.1", "port": 8470}
                                                for _ in range(node["_hosts"])]
                    events.append((self.on_ready, json.loads(json.dumps(node))))
        return events

    @staticmethod
    def _set_qr_state(qr: dict, state: str, initiator: Optional[str] = None) -> None:
        qr["state"] = state
        data_key = "".join(w.capitalize() if i else w.lower() for i, w in enumerate(state.split("_"))) + "Data"
        qr["json"]["state"] = {"state": state}
        if state != "WAITING_FOR_RESOURCES":  # QueuedResourceState has no data field for it
            qr["json"]["state"][data_key] = {}
        if initiator:
            qr["json"]["state"]["stateInitiator"] = initiator

    @staticmethod
    def _call(callback: Optional[NodeCallback], node: dict) -> None:
        if callback is None:
            return
        try:
            callback(node)
        except Exception as exc:  # a test callback's failure must not kill the ticker
            print(f"tpu_api_server: callback {callback!r} failed: {exc!r}")

    def _node(self, node: str) -> dict:
        for name, data in self.nodes.items():
            if name == node or name.rsplit("/", 1)[-1] == node:
                return data
        raise KeyError(f"no node {node!r}")

    # API ---------------------------------------------------------------------------------------
    def error_body(self, code: int, message: str) -> dict:
        return ApiError(code, message).body()

    def respond(self, method: str, path: str, query: dict[str, str], body: dict) -> tuple[int, dict]:
        return self.handle(method, path, query, body)

    def handle(self, method: str, path: str, query: dict[str, str], body: dict) -> tuple[int, dict]:
        match = re.fullmatch(r"/v2/(projects/[^/]+/locations/[^/]+)/(queuedResources|nodes|operations)(?:/([^/:]+))?",
                             path)
        if not match:
            raise ApiError(404, f"Method not found: {method} {path}")
        parent, collection, rid = match.groups()
        name = f"{parent}/{collection}/{rid}"
        with self._lock:
            if collection == "queuedResources":
                if method == "POST" and rid is None:
                    return 200, self._create_qr(parent, query.get("queuedResourceId", ""), body)
                if method == "GET" and rid is None:
                    items = [qr["json"] for n, qr in self.queued_resources.items() if n.startswith(parent + "/")]
                    return 200, {"queuedResources": items} if items else {}
                if method == "GET":
                    return 200, self._qr(name)["json"]
                if method == "DELETE" and rid is not None:
                    return 200, self._delete_qr(name, query.get("force", "").lower() == "true")
            elif collection == "nodes":
                if method == "GET" and rid is None:
                    items = [self._public(n) for k, n in self.nodes.items() if k.startswith(parent + "/")]
                    return 200, {"nodes": items} if items else {}
                if method == "GET":
                    return 200, self._public(self._get_node(name))
                if method == "DELETE" and rid is not None:
                    node = self._get_node(name)
                    node["state"], node["_delete_at"] = "DELETING", time.monotonic() + self.tick_s
                    return 200, self._operation(parent, name, "delete", self.tick_s, {"@type": _EMPTY_TYPE})
            elif method == "GET" and rid is not None:
                if name not in self.operations:
                    raise ApiError(404, f"Operation {name} not found")
                return 200, self.operations[name]["json"]
        raise ApiError(404, f"Method not found: {method} {path}")

    def _qr(self, name: str) -> dict:
        if name not in self.queued_resources:
            raise ApiError(404, f"Resource '{name}' was not found")
        return self.queued_resources[name]

    def _get_node(self, name: str) -> dict:
        if name not in self.nodes:
            raise ApiError(404, f"Resource '{name}' was not found")
        return self.nodes[name]

    @staticmethod
    def _public(node: dict) -> dict:
        return {k: v for k, v in node.items() if not k.startswith("_")}

    def _operation(self, parent: str, target: str, verb: str, delay_s: float, response: Any) -> dict:
        name = f"{parent}/operations/operation-{next(self._ids)}"
        meta = {"@type": _OP_METADATA, "createTime": _now(), "target": target, "verb": verb, "apiVersion": "v2"}
        op = {"json": {"name": name, "metadata": meta, "done": False}, "done_at": time.monotonic() + delay_s,
              "response": response}
        self.operations[name] = op
        if delay_s <= 0:
            op["json"]["done"], op["json"]["response"] = True, response() if callable(response) else response
        return op["json"]

    def _create_qr(self, parent: str, qr_id: str, body: dict) -> dict:
        self.create_bodies.append(body)
        if not re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", qr_id):
            raise ApiError(400, f"Invalid queuedResourceId {qr_id!r}")
        name = f"{parent}/queuedResources/{qr_id}"
        if name in self.queued_resources:
            raise ApiError(409, f"Resource '{name}' already exists")
        specs = body.get("tpu", {}).get("nodeSpec", [])
        if not specs:
            raise ApiError(400, "tpu.nodeSpec is required")
        node_names, templates = [], []
        for spec in specs:
            node = dict(spec.get("node", {}))
            accelerator = node.get("acceleratorType", "")
            if not accelerator or not node.get("runtimeVersion"):
                raise ApiError(400, "node.acceleratorType and node.runtimeVersion are required")
            try:
                hosts = self.hosts_for(accelerator)
            except Exception as exc:  # KeyError from the table, CatalogError from the catalog
                raise ApiError(400, f"Unknown accelerator type {accelerator!r}: {exc}") from None
            multi = spec.get("multisliceParams")
            if bool(multi) == bool(spec.get("nodeId")):
                raise ApiError(400, "exactly one of nodeId and multisliceParams must be set")
            if multi:
                count = int(multi.get("nodeCount", 0))
                if count < 2:
                    raise ApiError(400, "multisliceParams.nodeCount must be > 1")
                ids = [f"{multi.get('nodeIdPrefix') or qr_id}-{i}" for i in range(count)]
            else:
                ids = [spec["nodeId"]]
            for node_id in ids:
                node_name = f"{spec.get('parent') or parent}/nodes/{node_id}"
                if node_name in self.nodes or node_name in node_names:
                    raise ApiError(409, f"Node '{node_name}' already exists")
                node_names.append(node_name)
                templates.append({**node, "name": node_name, "state": "CREATING", "createTime": _now(),
                                  "queuedResource": name, "multisliceNode": bool(multi), "apiVersion": "V2",
                                  "id": str(next(self._ids)), "_hosts": hosts})
        now = time.monotonic()
        qr_json = {k: v for k, v in body.items() if k not in ("name", "state", "createTime")}
        qr_json.update(name=name, createTime=_now())
        qr = {"json": qr_json, "node_names": node_names, "node_templates": templates, "state": "",
              "timeline": [(now + i * self.tick_s, s) for i, s in enumerate(self.qr_states)],
              "fail": self._fail_next}
        self._fail_next = None
        self.queued_resources[name] = qr
        self._enter(qr, qr["timeline"].pop(0)[1])
        return self._operation(parent, name, "create", self.create_op_ticks * self.tick_s,
                               lambda: {"@type": _QR_TYPE, **qr_json})

    def _delete_qr(self, name: str, force: bool) -> dict:
        qr = self._qr(name)
        parent = name.split("/queuedResources/")[0]
        if not force and any(n in self.nodes for n in qr["node_names"]):
            raise ApiError(400, f"Queued resource '{name}' has nodes; delete them or use force",
                           "FAILED_PRECONDITION")
        if qr.get("delete_at") is None:
            qr["delete_at"] = time.monotonic() + self.tick_s
            qr["timeline"].clear()
            self._set_qr_state(qr, "DELETING")
            for node_name in qr["node_names"]:
                if node_name in self.nodes:
                    self.nodes[node_name]["state"] = "DELETING"
        delay = max(0.0, qr["delete_at"] - time.monotonic())
        return self._operation(parent, name, "delete", delay, {"@type": _EMPTY_TYPE})
