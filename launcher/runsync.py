"""Run-directory sync for hosts that do not share a filesystem with the supervisor (cloud TPU VMs).

Each such host's trainer writes into a host-local run directory; the supervisor pulls what was appended
(whole lines) through the host's Ray actor and appends it to the real run directory, so logs/, events.jsonl,
metrics.jsonl and result.json look the same as on a local pod.
"""
import os
from typing import Dict, List, Optional, Tuple

import ray

APPENDED = ("events.jsonl", "metrics.jsonl", "goodput.jsonl")
WHOLE = ("result.json",)


def host_files(host: int) -> Tuple[str, ...]:
    """What host `host` writes: its log, the appended files, its heartbeat, and (host 0) the result."""
    return (f"logs/host-{host}.log",) + APPENDED + (f"hosts/host-{host}.json",) + (WHOLE if host == 0 else ())


def is_whole(name: str) -> bool:
    """Files rewritten in place (copied whole), as opposed to appended to."""
    return name in WHOLE or name.startswith("hosts/")


def read_new(root: str, offsets: Dict[str, int]) -> Dict[str, Tuple[bytes, int]]:
    """On a host: bytes appended to each file since its offset, up to the last newline; whole small files."""
    out = {}
    for name, offset in offsets.items():
        path = os.path.join(root, name)
        try:
            with open(path, "rb") as f:
                if is_whole(name):
                    out[name] = (f.read(), 0)
                    continue
                f.seek(offset)
                chunk = f.read()
        except FileNotFoundError:
            continue
        cut = chunk.rfind(b"\n") + 1
        if cut:
            out[name] = (chunk[:cut], offset + cut)
    return out


class RunSync:
    """Pulls every host's new run-directory bytes into the supervisor's run directory."""

    def __init__(self, run_dir: str, actors: List, host_dirs: List[str], start: Optional[List[Dict]] = None):
        """start: per host, {name: size} of its files now (HostActor.prepare): what was already there (an
        earlier attempt's or launch's lines, synced then) is not synced again."""
        self.run_dir, self.actors, self.host_dirs = run_dir, actors, host_dirs
        self.offsets = {i: {name: 0 if is_whole(name) else int((start[i] if start else {}).get(name, 0))
                            for name in host_files(i)} for i in range(len(actors))}

    def pull(self, timeout_s: float = 30.0) -> None:
        refs = {i: a.pull.remote(self.host_dirs[i], self.offsets[i]) for i, a in enumerate(self.actors)}
        for i, ref in refs.items():
            try:
                chunks = ray.get(ref, timeout=timeout_s)
            except Exception:  # noqa: BLE001 - a dead or busy host: what it wrote last time is kept
                continue
            for name, (data, offset) in chunks.items():
                target = os.path.join(self.run_dir, name)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                if is_whole(name):
                    with open(target + ".tmp", "wb") as f:
                        f.write(data)
                    os.replace(target + ".tmp", target)
                    continue
                with open(target, "ab") as f:
                    f.write(data)
                self.offsets[i][name] = offset
