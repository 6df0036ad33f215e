"""Bench helper: the tests' in-memory GCS emulator (tests/gcs_emulator.py), and optionally latency proxies in front
of it (tests/gcs_fault_proxy.py, no faults), served from a child process so their request handling does not
share the benchmark's interpreter (its GIL) the way the tests' in-process fixtures do.

    with GCSServer(latencies=(0.0, 0.05)) as gcs:
        gcs.url              # the emulator itself (what STORAGE_EMULATOR_HOST / TENSORSTORE_GCS_HTTP_URL want)
        gcs.proxies[0.05]    # the same emulator behind a proxy adding 50 ms to every request
        gcs.use(gcs.url)     # point this process's clients at one of them
        gcs.wipe()           # delete every object (the emulator slows down as objects pile up)

Run as a script it is that child: it prints one JSON line with the URLs, then serves until stdin closes.
"""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
BUCKET = "bench-bucket"


class GCSServer:
    def __init__(self, latencies=()):
        self.latencies = tuple(float(x) for x in latencies)
        self.url = None
        self.proxies = {}
        self.bucket = BUCKET
        self._proc = None

    def start(self) -> "GCSServer":
        self._proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), json.dumps(self.latencies)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        line = self._proc.stdout.readline()
        if not line:
            raise SystemExit(f"the GCS emulator did not start (exit {self._proc.wait()})")
        info = json.loads(line)
        self.url = info["url"]
        self.proxies = {float(k): v for k, v in info["proxies"]}
        os.environ["GOOGLE_CLOUD_PROJECT"] = "test"
        self.use(self.url)
        return self

    def use(self, url: str) -> None:
        """Clients of this process (google-cloud-storage, gcsfs, tensorstore) talk to `url` from now on."""
        os.environ["STORAGE_EMULATOR_HOST"] = url
        os.environ["TENSORSTORE_GCS_HTTP_URL"] = url
        try:
            import gcsfs

            gcsfs.GCSFileSystem.clear_instance_cache()  # gcsfs caches filesystems (and their endpoint)
        except ImportError:  # pragma: no cover
            pass

    def wipe(self) -> None:
        self._proc.stdin.write("wipe\n")
        self._proc.stdin.flush()
        if self._proc.stdout.readline().strip() != "wiped":
            raise SystemExit("the GCS emulator did not answer a wipe")

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def _serve(latencies) -> None:
    sys.path.insert(0, TESTS)
    from gcs_emulator import GCSEmulator
    from gcs_fault_proxy import GCSFaultProxy

    emulator = GCSEmulator(bucket=BUCKET)
    url = emulator.start()
    proxies = []
    for latency in latencies:
        proxy = GCSFaultProxy(url, fault_rate=0.0, latency_s=latency)
        proxies.append((latency, proxy.start(), proxy))
    print(json.dumps({"url": url, "proxies": [(lat, purl) for lat, purl, _ in proxies]}), flush=True)
    # Started: from here on the emulator only prints tracebacks of clients hanging up (harmless BrokenPipe).
    sys.stderr = open(os.devnull, "w")
    try:
        for command in sys.stdin:  # until the parent closes stdin (or exits)
            if command.strip() == "wipe":
                emulator.wipe()
                print("wiped", flush=True)
    finally:
        for _, _, proxy in proxies:
            proxy.stop()
        emulator.stop()


if __name__ == "__main__":
    _serve(json.loads(sys.argv[1]) if len(sys.argv) > 1 else [])
