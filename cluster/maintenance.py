"""GCE maintenance and preemption notices on a TPU VM, read from the metadata server, turned into SIGTERM.

Compute Engine announces a host maintenance event (`instance/maintenance-event` becomes e.g.
TERMINATE_ON_HOST_MAINTENANCE) and a Spot preemption (`instance/preempted` becomes TRUE) on the VM's
metadata server shortly before it acts. The host actor runs one `MaintenanceWatch` per trainer; on a notice
it sends the trainer SIGTERM, the same preemption notice as any other: all hosts checkpoint at one agreed
step and exit to be restarted. The metadata server is http://metadata.google.internal on a TPU VM;
`LAUNCHER_METADATA_URL` overrides it (tests), and local stand-in hosts have none.
"""
import threading
import urllib.error
import urllib.request
from typing import Callable, Optional

METADATA_URL_ENV = "LAUNCHER_METADATA_URL"
GCE_METADATA_URL = "http://metadata.google.internal"
QUIET = {"maintenance-event": "NONE", "preempted": "FALSE"}


def read_notice(base_url: str, timeout_s: float = 2.0) -> Optional[str]:
    """A pending notice ('maintenance-event TERMINATE_ON_HOST_MAINTENANCE', 'preempted TRUE') or None."""
    for key, quiet in QUIET.items():
        req = urllib.request.Request(f"{base_url.rstrip('/')}/computeMetadata/v1/instance/{key}",
                                     headers={"Metadata-Flavor": "Google"})
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                value = resp.read().decode().strip()
        except (urllib.error.URLError, OSError, ValueError):
            continue  # the metadata server unreachable for a moment: no evidence either way
        if value and value.upper() != quiet:
            return f"{key} {value}"
    return None


class MaintenanceWatch:
    """Polls the metadata server every poll_s until a new notice arrives (calls on_notice once) or stop()."""

    def __init__(self, base_url: str, on_notice: Callable[[str], None], poll_s: float = 2.0):
        self.base_url, self.on_notice, self.poll_s = base_url, on_notice, poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="maintenance-watch", daemon=True)

    def start(self) -> "MaintenanceWatch":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        # A notice already pending when the watch starts was for an earlier trainer (it was honoured, and the
        # host is still here: the event passed or is being handled); only a new one counts.
        baseline = read_notice(self.base_url)
        while not self._stop.wait(self.poll_s):
            notice = read_notice(self.base_url)
            if notice is not None and notice != baseline:
                self.on_notice(notice)
                return
            if notice is None:
                baseline = None
