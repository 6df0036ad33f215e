"""TensorBoard event files in ${run.dir}/tb (tensorboardX, no TensorFlow): host 0's step and eval records, the goodput.

Who writes what (scalar tags):
  host 0, per logged step (metrics.jsonl's step records): train/loss, train/lr, train/grad_norm, and
      perf/tokens_per_s, perf/mfu, perf/step_time_s, perf/data_wait_s (not for the first step of an attempt,
      whose time includes compilation: it would flatten every perf curve)
  host 0, per eval: eval/<split>/loss, eval/<split>/ppl, eval/<split>/acc (split: val, test)
  the launcher, at the end of each launch: goodput/goodput and goodput/badput_<bucket>_s, at the run's last step
Every writer makes its own file (events.out.tfevents.<time>.<hostname>.<who>.<pid>.<n>), so a restarted attempt or a
later launch appends a file and never clobbers one. A trainer attempt that starts from step k marks its file
with a session START at step k+1: TensorBoard then hides what earlier files logged past step k (steps an
earlier attempt ran past its last checkpoint and this attempt runs again), so a resumed run's curve has one
value per step. Events are written synchronously (no writer thread) and flushed per record, so what a host
has logged is on disk when it dies, and a file is always whole records but for the one being written.
"""
import itertools
import os
import struct
import time
from typing import Dict, Iterator, List, Optional, Tuple

# EVENT_FILE: names of the event files ours and TensorBoard's writers make (what the run-dir sync of cloud hosts
# and the bucket mirror accept)
from trainer.runfiles import EVENT_FILE, METRICS, TB, iter_jsonl

TRAIN_TAGS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm"}
PERF_TAGS = {"tokens_per_s": "perf/tokens_per_s", "mfu": "perf/mfu", "step_time_s": "perf/step_time_s",
             "data_wait_s": "perf/data_wait_s"}
EVAL_TAGS = {"eval_loss": "loss", "eval_ppl": "ppl", "eval_acc": "acc"}
_SEQUENCE = itertools.count()
_HEADER = struct.Struct("<QI")  # TFRecord framing: uint64 length, uint32 masked crc of it; data; uint32 crc


def record_scalars(record: dict) -> Dict[str, float]:
    """The scalars (tag -> value) of a metrics.jsonl record: a step record or an eval record."""
    if "split" in record:
        return {f"eval/{record['split']}/{name}": record[key] for key, name in EVAL_TAGS.items() if key in record}
    tags = dict(TRAIN_TAGS) if record.get("includes_compile") else {**TRAIN_TAGS, **PERF_TAGS}
    return {tag: record[key] for key, tag in tags.items() if record.get(key) is not None}


def goodput_scalars(summary: dict) -> Dict[str, float]:
    """The goodput and badput buckets (seconds) of a summary.json."""
    out = {"goodput/goodput": summary.get("goodput")}
    out.update({f"goodput/badput_{bucket}_s": value for bucket, value in (summary.get("badput") or {}).items()})
    return {tag: value for tag, value in out.items() if isinstance(value, (int, float))}


def write_goodput(run_dir: str, summary: dict) -> None:
    """The launcher's end-of-launch scalars, in a file of its own, at the launch's last step: summary.json's
    final_step, else (a failed or stopped launch) the last step metrics.jsonl logged."""
    step = summary.get("final_step")
    if step is None:
        step = max((r["step"] for r in iter_jsonl(os.path.join(run_dir, METRICS))
                    if "split" not in r and isinstance(r.get("step"), int)), default=0)
    writer = EventWriter(run_dir, "launcher")
    try:
        writer.scalars(step, goodput_scalars(summary))
    finally:
        writer.close()


class EventWriter:
    """One event file in run_dir/tb. purge_from: the first step this writer logs after a restore (or a fresh
    start): TensorBoard drops the steps >= it that earlier files logged."""

    def __init__(self, run_dir: str, who: str, purge_from: Optional[int] = None):
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog

        self._event = Event
        directory = os.path.join(run_dir, TB)
        os.makedirs(directory, exist_ok=True)
        # EventsWriter names the file events.out.tfevents.<time>.<hostname><suffix> and truncates one of that name:
        # ours adds who, the pid and a sequence number, so two writers starting in the same second (an attempt and
        # its restart, the launcher) never share a file.
        self._writer = EventsWriter(os.path.join(directory, "events"), f".{who}.{os.getpid()}.{next(_SEQUENCE)}")
        if purge_from is not None:
            self._writer.write_event(Event(step=int(purge_from), wall_time=time.time(),
                                           session_log=SessionLog(status=SessionLog.START)))
        self._writer.flush()

    def scalars(self, step: int, values: Dict[str, float], wall_time: Optional[float] = None) -> None:
        from tensorboardX.summary import scalar

        if not values:
            return
        event = self._event(step=int(step), wall_time=time.time() if wall_time is None else float(wall_time))
        event.summary.value.extend(scalar(tag, float(value)).value[0] for tag, value in sorted(values.items()))
        self._writer.write_event(event)
        self._writer.flush()

    def record(self, record: dict) -> None:
        """A metrics.jsonl record (step or eval), at its step and time."""
        self.scalars(record["step"], record_scalars(record), record.get("time"))

    def close(self) -> None:
        self._writer.close()


def whole_records(data: bytes) -> int:
    """The length of the longest prefix of `data` made of whole TFRecords (the file's bytes from a record start)."""
    pos = 0
    while pos + _HEADER.size <= len(data):
        (length, _), end = _HEADER.unpack_from(data, pos), pos + _HEADER.size
        end += length + 4
        if end > len(data):
            break
        pos = end
    return pos


def read_records(path: str) -> Iterator[bytes]:
    """The payloads of an event file's whole, checksummed records; reading stops at a torn or corrupt record."""
    from tensorboardX.record_writer import masked_crc32c

    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos + _HEADER.size <= len(data):
        length, header_crc = _HEADER.unpack_from(data, pos)
        start = pos + _HEADER.size
        if header_crc != masked_crc32c(data[pos:pos + 8]) or start + length + 4 > len(data):
            return
        payload = data[start:start + length]
        if struct.unpack_from("<I", data, start + length)[0] != masked_crc32c(payload):
            return
        yield payload
        pos = start + length + 4


def event_files(run_dir: str) -> List[str]:
    """The run's event files in the order TensorBoard reads them (by name: the creation time leads)."""
    directory = os.path.join(run_dir, TB)
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return [os.path.join(directory, n) for n in sorted(names) if EVENT_FILE.fullmatch(n)]


def read_scalars(run_dir: str) -> Dict[str, List[Tuple[int, float]]]:
    """Every scalar of the run's event files as TensorBoard shows it: tag -> [(step, value)] in file order, with a
    session START at step s dropping the values at steps >= s read before it (a resumed attempt's purge)."""
    from tensorboardX.proto.event_pb2 import Event, SessionLog

    out: Dict[str, List[Tuple[int, float]]] = {}
    for path in event_files(run_dir):
        for payload in read_records(path):
            event = Event.FromString(payload)
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                out = {tag: [(s, v) for s, v in points if s < event.step] for tag, points in out.items()}
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out
