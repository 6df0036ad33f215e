"""Run the supervisor as a Ray job on the cluster's head, so closing the laptop does not stop the run.

The laptop submits `python -m launcher <same overrides> launcher.in_job=true` to the head's job server, then
follows its logs; Ctrl-C detaches (the run goes on). Typing the same command again finds the live job of
that run (by its `launcher-run` metadata) and follows it instead of submitting a second one.
"""
import asyncio
import os
import re
import shlex
import sys
import time
from typing import List, Optional, Tuple
from urllib.parse import urlsplit

from ray.job_submission import JobStatus, JobSubmissionClient

from launcher.errors import UserError
from trainer.runfiles import EXIT_FAILED, EXIT_OK
from launcher.tunnel import TunnelError

LIVE = (JobStatus.PENDING, JobStatus.RUNNING)
KNOWN_HOSTS = "known_hosts"  # in the run's record: the head VM's SSH host key, pinned on first use


def job_server_url(ray_address: str, port: int) -> str:
    host = ray_address.split("://")[-1].rsplit(":", 1)[0]
    return f"http://{host}:{port}"


def connect(url: str, wait_s: float = 30.0) -> JobSubmissionClient:
    """The job server at `url`, with this process's Ray token (launcher/auth.py set it up); one line if it is
    not there, or refuses the token."""
    from launcher import auth

    deadline = time.time() + wait_s
    while True:
        try:
            return JobSubmissionClient(url)
        except Exception as e:  # noqa: BLE001 - unreachable, no dashboard (yet), or our token refused: one line
            if auth.is_auth_error(e):
                raise auth.refused(url, auth.token_source()) from None
            if time.time() < deadline:
                time.sleep(1.0)
                continue
            raise UserError(
                "ray.address", f"no Ray job server at {url} ({type(e).__name__})",
                "start the head with its dashboard (ray start --head --include-dashboard=true), "
                "set ray.dashboard_port, or run the supervisor here with launcher.submit=false") from None


def live_job(client: JobSubmissionClient, run_name: str) -> Optional[str]:
    for job in client.list_jobs():
        if (job.metadata or {}).get("launcher-run") == run_name and job.status in LIVE:
            return job.submission_id
    return None


STOP_WAIT_ENV = "RAY_JOB_STOP_WAIT_TIME_S"


def stop_env(cfg) -> dict:
    """The supervisor job's env for a graceful `tpu-launch stop`: Ray's job server sends the launcher SIGTERM, then
    SIGKILL after RAY_JOB_STOP_WAIT_TIME_S (3 s by default, far too short for the hosts to checkpoint). Give it as
    long as the graceful path can take: the hosts' grace, then deleting the TPU resources; SIGKILL is a backstop."""
    return {STOP_WAIT_ENV: str(int(cfg.supervisor.stop_grace_s) + int(cfg.cluster.provision_timeout_s) + 60)}


def supervisor_python(cfg, own_head: bool) -> str:
    """The interpreter of the supervisor job, as the first shell word of its entrypoint (the job server runs it
    with a shell on the head): one the project is installed in, where the launcher can tell. `ray.python` if set;
    on the head VM of the run, its venv's python (its startup script exports it before `ray start`:
    cluster/head_vm.py); on a head on this machine, this very interpreter; else `python` on the head's PATH."""
    from cluster.head_vm import PYTHON_ENV

    if cfg.ray.python:
        return shlex.quote(str(cfg.ray.python))
    if own_head:  # the fallback is for a head that did not boot from our script (the tests' head on this machine)
        fallback = re.sub(r'([\\"$`])', r"\\\1", sys.executable)  # as it stands inside double quotes
        return f'"${{{PYTHON_ENV}:-{fallback}}}"'
    if on_this_machine(str(cfg.ray.address)):
        return shlex.quote(sys.executable)
    return "python"


def on_this_machine(address: str) -> bool:
    """Whether a Ray address names this machine: `auto` (a cluster started here), loopback, or an address of one of
    its network interfaces."""
    import ipaddress
    import socket

    import psutil

    if address == "auto":
        return True
    host = urlsplit("//" + address.split("://")[-1]).hostname or ""
    try:
        ips = {info[4][0] for info in socket.getaddrinfo(host, None)} if host else set()
    except (OSError, UnicodeError):  # not resolvable from here: not a name of this machine
        return False
    mine = {a.address for addrs in psutil.net_if_addrs().values() for a in addrs}
    return any(ip in mine or ipaddress.ip_address(ip.split("%")[0]).is_loopback for ip in ips)


def entrypoint(python: str, argv: List[str]) -> str:
    """The supervisor job's command line: `python` (a shell word, supervisor_python) runs the launcher in the job."""
    return " ".join([python, *(shlex.quote(a) for a in
                               ["-m", "launcher", *argv, "launcher.in_job=true", "launcher.preflight=false"])])


def submit(client: JobSubmissionClient, run_name: str, argv: List[str], env: dict, python: str) -> str:
    entrypoint_ = entrypoint(python, argv)
    deadline = time.time() + 60
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint_, submission_id=f"launcher-{run_name}-{int(time.time())}",
                                     metadata={"launcher-run": run_name}, runtime_env={"env_vars": env})
        except RuntimeError as e:  # a head that just started: "No available agent" / 503 / 504 for a while
            if not any(m in str(e) for m in ("try again later", "code 503", "code 504")) or time.time() > deadline:
                raise
            time.sleep(1.0)


def follow(client: JobSubmissionClient, job_id: str, out=None) -> Tuple[int, bool]:
    """Print the job's output until it ends (its launcher's exit code, True), or until Ctrl-C (0, False)."""
    out = out or sys.stdout

    async def tail():
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(tail())
    except KeyboardInterrupt:
        print(f"\n[launcher] detached; job {job_id} goes on. Type the same command again to follow it.",
              flush=True)
        return EXIT_OK, False
    info = client.get_job_info(job_id)
    if info.status == JobStatus.SUCCEEDED:
        return EXIT_OK, True
    code = info.driver_exit_code
    return (int(code) if code not in (None, 0) else EXIT_FAILED), True


class HeadForRun:
    """The run's Ray head VM (cluster/head_vm.py): created with the staged wheel, deleted after the run.

    Its job server listens on the head's loopback only; this terminal reaches it through an SSH tunnel to the
    head's port 22 (launcher/tunnel.py), with the run's own key pair (public half in the VM's `ssh-keys`
    metadata, private half 0600 in the run's record) and the head's host key pinned on first use.
    """

    def __init__(self, cfg):
        from cluster.head_vm import HeadVm, make_compute_client
        from launcher.auth import record_dir
        from launcher.tunnel import ensure_keypair

        c = cfg.cluster
        self.cfg, self.record = cfg, record_dir(cfg.run.dir)
        self.keys = ensure_keypair(self.record, str(c.ssh_user))
        self.tunnel = None
        self.vm = HeadVm(c.project, c.zone, client=make_compute_client(c.compute_api_endpoint),
                         machine_type=c.head_machine_type, image=c.head_image, network=c.network,
                         subnetwork=c.subnetwork, service_account=c.service_account,
                         poll_s=0.5 if c.compute_api_endpoint else 5.0, external_ip=bool(c.head_external_ip),
                         progress=lambda msg: print(f"[launcher] {msg}", flush=True))

    def up(self) -> Tuple[str, str]:
        """(Ray address the TPU VMs join: internal IP, the job server's URL here: through the SSH tunnel)."""
        from cluster.bootstrap import token_metadata
        from cluster.head_vm import head_startup_script
        from launcher.wheel import staged_for_run

        c, ray_cfg = self.cfg.cluster, self.cfg.ray
        staged, _ = staged_for_run(c.bucket)
        script = head_startup_script(staged, int(ray_cfg.port), int(ray_cfg.dashboard_port))
        metadata = {"ssh-keys": self.keys.metadata_value(str(c.ssh_user)),
                    **token_metadata(str(c.project), self.cfg.run.name, c.secret_manager_endpoint)}
        self.vm.ensure(self.cfg.run.name, script, dict(c.labels), metadata=metadata)
        info = self.vm.wait_running(self.cfg.run.name)
        return f"{info['internal_ip']}:{int(ray_cfg.port)}", self._tunnel(info)

    def reach(self) -> Optional[str]:
        """The job server's URL here, through an SSH tunnel to the run's head VM if it is up (nothing is created);
        None when the run has no live head VM (`tpu-launch stop`: nothing to stop)."""
        from cluster.head_vm import ALIVE

        if self.vm.status(self.cfg.run.name) not in ALIVE:
            return None
        return self._tunnel(self.vm.wait_running(self.cfg.run.name))

    def _tunnel(self, info: dict) -> str:
        from launcher.tunnel import SshTunnel

        c, ray_cfg = self.cfg.cluster, self.cfg.ray
        ssh_host = info.get("external_ip") or info["internal_ip"]
        self.tunnel = SshTunnel(ssh_host, str(c.ssh_user), self.keys.private_path,
                                os.path.join(self.record, KNOWN_HOSTS), remote_host="127.0.0.1",
                                remote_port=int(ray_cfg.dashboard_port), ssh_port=int(c.head_ssh_port),
                                connect_timeout_s=300, auth_retry_s=120)
        try:
            self.tunnel.open()
        except TunnelError as e:
            raise UserError("cluster.head_ssh_port", f"no SSH tunnel to the head VM: {e}",
                            "check that port 22 of the head is reachable from here (firewall rule "
                            "default-allow-ssh, or cluster.head_external_ip=false from inside the VPC)") from None
        print(f"[launcher] job server of the head reached through an SSH tunnel to {ssh_host}", flush=True)
        return self.tunnel.url

    def close(self) -> None:
        if self.tunnel is not None:
            self.tunnel.close()
            self.tunnel = None

    def down(self) -> None:
        self.close()
        self.vm.delete(self.cfg.run.name, wait=True)
