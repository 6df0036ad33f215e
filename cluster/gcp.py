"""The GCP provider: TPU slices as one queued resource per run, through the official google-cloud-tpu client.

One queued resource per run, named from the run (`<run>-qr`), with one node per slice: `node_id=<run>` for
a single slice, `multislice_params(node_count=N, node_id_prefix=<run>)` (nodes `<run>-0`..`<run>-N-1`) for
multislice. `ensure` is idempotent: it reuses a live queued resource and deletes a dead one (FAILED,
SUSPENDED, or with a PREEMPTED/TERMINATED/... or missing node: those still hold quota) before re-creating.

Capacity (v2 API fields): "spot" sets the queued resource's `spot` tier; "on_demand" sets no tier (the
default); "reserved" sets the nodes' `scheduling_config.reserved` and, when a reservation is named,
`reservation_name` (v2 has no `guaranteed.reserved`; that field is v2alpha1 only).
"""

from __future__ import annotations

import hashlib
import re
import time
from typing import Any, Callable, Optional
from urllib.parse import urlsplit

from google.api_core import exceptions as gexc

QR_PENDING = {"STATE_UNSPECIFIED", "CREATING", "ACCEPTED", "WAITING_FOR_RESOURCES", "PROVISIONING"}
QR_DEAD = {"FAILED", "SUSPENDING", "SUSPENDED"}
NODE_ALIVE = {"CREATING", "READY", "RESTARTING", "REIMAGING", "REPAIRING", "STARTING"}
NOT_FOUND = "NOT_FOUND"
CAPACITIES = ("on_demand", "spot", "reserved")
CREDENTIALS_HINT = ("no Google Cloud credentials found: run `gcloud auth application-default login` "
                    "or set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file")


class ProvisionError(Exception):
    """Cloud TPU capacity could not be obtained or managed (no credentials, FAILED, suspended, timeout)."""


def rest_transport_args(endpoint: Optional[str] = None) -> dict:
    """Keyword arguments for any google-cloud client's REST transport: against `endpoint` (http://HOST:PORT, our
    test servers) its host, scheme and anonymous credentials; else the default credentials, or ProvisionError
    with the hint to log in. The one place that decides how our Google API clients authenticate."""
    if endpoint:
        from google.auth.credentials import AnonymousCredentials

        url = urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
        return {"host": url.netloc, "url_scheme": url.scheme or "http", "credentials": AnonymousCredentials()}
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError

    try:
        credentials, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/cloud-platform"])
    except DefaultCredentialsError as exc:
        raise ProvisionError(CREDENTIALS_HINT) from exc
    return {"credentials": credentials}


def make_client(endpoint: Optional[str] = None) -> Any:
    """A `tpu_v2.TpuClient` over REST: default credentials, or anonymous ones against `endpoint` (tests)."""
    from google.cloud import tpu_v2
    from google.cloud.tpu_v2.services.tpu.transports.rest import TpuRestTransport

    return tpu_v2.TpuClient(transport=TpuRestTransport(**rest_transport_args(endpoint)))


def tpu_name(run_name: str) -> str:
    """A TPU-name-safe base for a run (lowercase, [a-z][-a-z0-9]*, <= 40 chars; hashed suffix if altered)."""
    base = re.sub(r"[^a-z0-9-]+", "-", run_name.lower()).strip("-")
    base = re.sub(r"-{2,}", "-", base)
    if not base or not base[0].isalpha():
        base = f"r-{base}".rstrip("-")
    if base != run_name or len(base) > 40:
        digest = hashlib.sha1(run_name.encode()).hexdigest()[:6]
        base = f"{base[:33].rstrip('-')}-{digest}"
    return base


def _state_name(state: Any) -> str:
    return getattr(state, "name", str(state))


def wait_operation(operation: Any, what: str, timeout_s: float, poll_s: float) -> Any:
    """Poll a long-running Google API operation to its end; ProvisionError (with the operation's own error
    codes when it has them) on failure or timeout. Used for TPU and Compute Engine operations alike."""
    deadline = time.monotonic() + timeout_s
    while not operation.done():
        if time.monotonic() > deadline:
            raise ProvisionError(f"timed out after {timeout_s:.0f}s waiting to {what}")
        time.sleep(poll_s)
    try:
        return operation.result(timeout=0)
    except gexc.GoogleAPICallError as exc:
        error = getattr(operation, "error", None)  # Compute operations carry an error list: codes, not HTTP text
        errors = [f"{e.code}: {e.message}" for e in getattr(error, "errors", [])] if error else []
        raise ProvisionError(f"could not {what}: {'; '.join(errors) or exc.message}") from exc


class GcpTpuProvider:
    """Creates, watches and deletes a run's TPU slices as one Cloud TPU queued resource."""

    def __init__(self, project: str, zone: str, client: Any = None, poll_s: float = 5.0,
                 timeout_s: float = 3600, progress: Callable[[str], None] = print):
        self.project, self.zone, self.poll_s, self.timeout_s, self.progress = project, zone, poll_s, timeout_s, progress
        self.client = client if client is not None else make_client()
        self.parent = f"projects/{project}/locations/{zone}"

    # names ---------------------------------------------------------------------------------------
    def qr_id(self, run_name: str) -> str:
        return f"{tpu_name(run_name)}-qr"

    def qr_name(self, run_name: str) -> str:
        return f"{self.parent}/queuedResources/{self.qr_id(run_name)}"

    def _node_names(self, qr: Any) -> list[str]:
        """Full node names of a queued resource, in slice order, from its node specs."""
        names = []
        qr_id = qr.name.rsplit("/", 1)[-1]
        for spec in qr.tpu.node_spec:
            parent = spec.parent or self.parent
            if spec.node_id:
                names.append(f"{parent}/nodes/{spec.node_id}")
            else:
                params = spec.multislice_params
                prefix = params.node_id_prefix or qr_id
                names.extend(f"{parent}/nodes/{prefix}-{i}" for i in range(params.node_count))
        return names

    # API calls -----------------------------------------------------------------------------------
    def _get_qr(self, run_name: str) -> Optional[Any]:
        try:
            return self.client.get_queued_resource(name=self.qr_name(run_name))
        except gexc.NotFound:
            return None

    def _get_nodes(self, qr: Any) -> list[tuple[str, Optional[Any]]]:
        out: list[tuple[str, Optional[Any]]] = []
        for name in self._node_names(qr):
            try:
                out.append((name, self.client.get_node(name=name)))
            except gexc.NotFound:
                out.append((name, None))
        return out

    def _wait_operation(self, operation: Any, what: str) -> Any:
        return wait_operation(operation, what, self.timeout_s, self.poll_s)

    def _dead_reason(self, qr: Any) -> Optional[str]:
        """Why an existing queued resource cannot be reused, or None when it is live."""
        state = _state_name(qr.state.state)
        if state in QR_DEAD:
            return f"queued resource is {state}"
        if state != "ACTIVE":
            return None
        for name, node in self._get_nodes(qr):
            node_state = NOT_FOUND if node is None else _state_name(node.state)
            if node_state not in NODE_ALIVE:
                return f"node {name.rsplit('/', 1)[-1]} is {node_state}"
        return None

    # public API ----------------------------------------------------------------------------------
    def ensure(self, run_name: str, accelerator_type: str, runtime_version: str, num_slices: int = 1,
               capacity: str = "on_demand", network: Optional[str] = None, subnetwork: Optional[str] = None,
               service_account: Optional[str] = None, labels: Optional[dict] = None,
               metadata: Optional[dict] = None, reservation: Optional[str] = None) -> str:
        """Make sure the run's queued resource exists and is live (reuse, or clean up and re-create); its name."""
        if capacity not in CAPACITIES:
            raise ProvisionError(f"capacity must be one of {', '.join(CAPACITIES)}, not {capacity!r}")
        if num_slices < 1:
            raise ProvisionError(f"num_slices must be >= 1, not {num_slices}")
        name = self.qr_name(run_name)
        qr = self._get_qr(run_name)
        if qr is not None:
            state = _state_name(qr.state.state)
            if state == "DELETING":
                self.progress(f"gcp: {self.qr_id(run_name)} is being deleted; waiting before re-creating")
                self._wait_gone(run_name)
            elif (reason := self._dead_reason(qr)) is not None:
                self.progress(f"gcp: {self.qr_id(run_name)}: {reason}; deleting it (it holds quota) to re-create")
                self.delete(run_name, wait=True)
            else:
                self._check_matches(qr, run_name, accelerator_type, num_slices)
                self.progress(f"gcp: reusing queued resource {self.qr_id(run_name)} ({state})")
                return name
        self._create(run_name, accelerator_type, runtime_version, num_slices, capacity, network, subnetwork,
                     service_account, labels, metadata, reservation)
        return name

    def _check_matches(self, qr: Any, run_name: str, accelerator_type: str, num_slices: int) -> None:
        specs = list(qr.tpu.node_spec)
        have_type = specs[0].node.accelerator_type if specs else ""
        have_slices = len(self._node_names(qr))
        if have_type != accelerator_type or have_slices != num_slices:
            raise ProvisionError(
                f"queued resource {qr.name} already exists with {have_slices} x {have_type}, not "
                f"{num_slices} x {accelerator_type}; to change the shape, delete it first with `tpu-launch down "
                f"{run_name}` (or the run's directory; checkpoints stay)")

    def _create(self, run_name: str, accelerator_type: str, runtime_version: str, num_slices: int,
                capacity: str, network: Optional[str], subnetwork: Optional[str], service_account: Optional[str],
                labels: Optional[dict], metadata: Optional[dict], reservation: Optional[str]) -> None:
        from google.cloud import tpu_v2

        base = tpu_name(run_name)
        node = tpu_v2.Node(
            accelerator_type=accelerator_type, runtime_version=runtime_version,
            labels={**(labels or {}), "launcher-run": base}, metadata=dict(metadata or {}),
        )
        if network or subnetwork:
            node.network_config = tpu_v2.NetworkConfig(network=network or "", subnetwork=subnetwork or "")
        if service_account:
            node.service_account = tpu_v2.ServiceAccount(
                email=service_account, scope=["https://www.googleapis.com/auth/cloud-platform"])
        if capacity == "reserved":
            node.scheduling_config = tpu_v2.SchedulingConfig(reserved=True)
        spec = tpu_v2.QueuedResource.Tpu.NodeSpec(parent=self.parent, node=node)
        if num_slices > 1:
            spec.multislice_params = tpu_v2.QueuedResource.Tpu.NodeSpec.MultisliceParams(
                node_count=num_slices, node_id_prefix=base)
        else:
            spec.node_id = base
        qr = tpu_v2.QueuedResource(tpu=tpu_v2.QueuedResource.Tpu(node_spec=[spec]))
        if capacity == "spot":
            qr.spot = tpu_v2.QueuedResource.Spot()
        if capacity == "reserved" and reservation:
            qr.reservation_name = reservation
        qr_id = self.qr_id(run_name)
        self.progress(f"gcp: creating queued resource {qr_id}: {num_slices} x {accelerator_type} ({capacity})")
        try:
            operation = self.client.create_queued_resource(parent=self.parent, queued_resource=qr,
                                                           queued_resource_id=qr_id)
        except gexc.AlreadyExists:
            self.progress(f"gcp: {qr_id} already exists (created concurrently); reusing it")
            return
        except gexc.GoogleAPICallError as exc:
            raise ProvisionError(f"could not create queued resource {qr_id}: {exc.message}") from exc
        self._wait_operation(operation, f"create queued resource {qr_id}")

    def wait_active(self, run_name: str) -> list[dict]:
        """Follow the queued resource until it and all its nodes are ready; the nodes, in slice order."""
        qr_id = self.qr_id(run_name)
        start = time.monotonic()
        last = ""
        while True:
            qr = self._get_qr(run_name)
            if qr is None:
                raise ProvisionError(f"queued resource {qr_id} does not exist (deleted?)")
            state = _state_name(qr.state.state)
            nodes = self._get_nodes(qr) if state in ("PROVISIONING", "ACTIVE") else []
            node_states = [NOT_FOUND if n is None else _state_name(n.state) for _, n in nodes]
            line = state + (f" nodes: {', '.join(node_states)}" if nodes else "")
            if line != last:
                self.progress(f"gcp: {qr_id}: {line} ({time.monotonic() - start:.0f}s)")
                last = line
            if state in QR_DEAD or state == "DELETING":
                detail = qr.state.failed_data.error.message if state == "FAILED" else ""
                raise ProvisionError(f"queued resource {qr_id} is {state}" + (f": {detail}" if detail else ""))
            if state == "ACTIVE":
                dead = [(n, s) for (n, _), s in zip(nodes, node_states) if s not in NODE_ALIVE]
                if dead:
                    raise ProvisionError(f"queued resource {qr_id} is ACTIVE but node "
                                         f"{dead[0][0].rsplit('/', 1)[-1]} is {dead[0][1]}")
                if all(s == "READY" for s in node_states):
                    return [self._node_dict(n) for _, n in nodes]
            if time.monotonic() - start > self.timeout_s:
                raise ProvisionError(f"timed out after {self.timeout_s:.0f}s waiting for {qr_id} ({line})")
            time.sleep(self.poll_s)

    @staticmethod
    def _node_dict(node: Any) -> dict:
        return {"name": node.name.rsplit("/", 1)[-1], "full_name": node.name, "state": _state_name(node.state),
                "accelerator_type": node.accelerator_type, "runtime_version": node.runtime_version,
                "ips": [e.ip_address for e in node.network_endpoints], "labels": dict(node.labels),
                "metadata": dict(node.metadata)}

    def endpoints(self, run_name: str) -> list[list[str]]:
        """Per slice (node, in slice order), the workers' internal IPs in worker-id order."""
        qr = self._get_qr(run_name)
        if qr is None:
            raise ProvisionError(f"queued resource {self.qr_id(run_name)} does not exist")
        out = []
        for name, node in self._get_nodes(qr):
            if node is None:
                raise ProvisionError(f"node {name.rsplit('/', 1)[-1]} does not exist")
            out.append([e.ip_address for e in node.network_endpoints])
        return out

    def state(self, run_name: str) -> str:
        """The run's queued resource's state (ACTIVE, WAITING_FOR_RESOURCES, ...), NOT_FOUND when there is none."""
        qr = self._get_qr(run_name)
        return NOT_FOUND if qr is None else _state_name(qr.state.state)

    def node_states(self, run_name: str) -> dict[str, str]:
        """Node short name -> state (READY, PREEMPTED, ..., NOT_FOUND when a node is gone); {} without a resource."""
        qr = self._get_qr(run_name)
        if qr is None:
            return {}
        return {name.rsplit("/", 1)[-1]: NOT_FOUND if node is None else _state_name(node.state)
                for name, node in self._get_nodes(qr)}

    def delete(self, run_name: str, wait: bool = True) -> None:
        """Delete the run's queued resource and its nodes (force); a missing one is fine."""
        from google.cloud import tpu_v2

        request = tpu_v2.DeleteQueuedResourceRequest(name=self.qr_name(run_name), force=True)
        try:
            operation = self.client.delete_queued_resource(request=request)
        except gexc.NotFound:
            return
        except gexc.GoogleAPICallError as exc:  # e.g. already being deleted
            qr = self._get_qr(run_name)
            if qr is None:
                return
            if _state_name(qr.state.state) != "DELETING":
                raise ProvisionError(f"could not delete queued resource {self.qr_id(run_name)}: {exc.message}") from exc
            operation = None
        self.progress(f"gcp: deleting queued resource {self.qr_id(run_name)}")
        if not wait:
            return
        if operation is not None:
            self._wait_operation(operation, f"delete queued resource {self.qr_id(run_name)}")
        self._wait_gone(run_name)

    def _wait_gone(self, run_name: str) -> None:
        deadline = time.monotonic() + self.timeout_s
        while self._get_qr(run_name) is not None:
            if time.monotonic() > deadline:
                raise ProvisionError(f"timed out waiting for {self.qr_id(run_name)} to be deleted")
            time.sleep(self.poll_s)
