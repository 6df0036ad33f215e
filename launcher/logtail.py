"""Echo host 0's progress lines (`[host 0] ...`) from its log file into the launcher's terminal."""
import os
import sys
import threading


class LogTail:
    def __init__(self, path: str, prefix: str = "[host 0]", out=None, poll_s: float = 0.2, on_line=None):
        """on_line(line): what to do with each line of host 0 (default: write it to `out`)."""
        self.path, self.prefix, self.out, self.poll_s = path, prefix, out or sys.stdout, poll_s
        self.on_line = on_line or self._write
        self.offset = os.path.getsize(path) if os.path.exists(path) else 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="logtail", daemon=True)
        self._buf = b""

    def start(self) -> "LogTail":
        self._thread.start()
        return self

    def _pump(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return
        self.offset += len(chunk)
        self._buf += chunk
        *lines, self._buf = self._buf.split(b"\n")
        for raw in lines:
            line = raw.decode(errors="replace")
            if line.startswith(self.prefix):
                self.on_line(line)
        self.out.flush()

    def _write(self, line: str) -> None:
        self.out.write(line + "\n")

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            self._pump()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._pump()
