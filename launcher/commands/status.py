"""One row per run: state, step/total, loss, tokens/s, MFU, ETA, goodput, restarts by cause, hosts alive, and for
cloud runs the queued resource, its state and the cost so far at list price.

States, from the run directory alone:
  running          a live launcher holds the run lock (or, for a cloud run whose supervisor is a Ray job on the
                   head, the latest launch has no end and the queued resource is live)
  restarting       a live launcher whose latest attempt failed and whose hosts are not training again yet
  completed, failed, stopped
                   the latest launch ended (events.jsonl command_end): summary.json's status
  supervisor lost  the latest launch has no end and nothing holds the lock: its launcher died (type the run's
                   command again to take it over and resume it)
  not started      no launch recorded (a dry run's plan only)

Hosts alive: heartbeats (hosts/host-<i>.json) of the latest attempt with no exit record, written within
5 heartbeat periods (watchdog.heartbeat_s), with the oldest such heartbeat's age. ETA: the remaining steps of
trainer.steps at the rate of the latest logged steps. Goodput and restarts: goodput.jsonl, summed now. Cost: the
slice's list price per hour (cluster/catalog.py, or cluster.price_on_demand / price_spot) times the hours from
each launch's command_start to its command_end (now, for a launch still going): an upper bound, as the queued
resource is created after the start and deleted before the end.
"""
import json
import os
import sys
import time
from typing import List, Optional

from launcher import goodput, mirror
from launcher.blame import heartbeats
from launcher.commands.common import add_root, all_runs, refresh, resolve_run
from launcher.errors import first_line
from launcher.rundir import RunDir
from trainer import runfiles

HELP = "one row per run: state, step, loss, tokens/s, MFU, ETA, goodput, restarts, hosts, cloud resources"
STALE_BEATS = 5  # a heartbeat older than this many periods is a host that stopped beating
API_TIMEOUT_S = 10.0

RUNNING, RESTARTING, LOST, NOT_STARTED = "running", "restarting", "supervisor lost", "not started"


def add_arguments(p) -> None:
    p.add_argument("runs", nargs="*", metavar="RUN", help="run directories or names (default: every run under --root)")
    add_root(p)
    p.add_argument("--json", action="store_true", help="one JSON object per run per line")
    p.add_argument("--watch", nargs="?", type=float, const=2.0, default=None, metavar="SECONDS",
                   help="refresh every SECONDS (default 2) until Ctrl-C")


def _num(x) -> Optional[float]:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _launches(events: List[dict]) -> List[dict]:
    """Each launch of the run: {"start", "end" (None: no end recorded)} from command_start / command_end."""
    out: List[dict] = []
    for e in events:
        if e.get("host") != "launcher" or _num(e.get("time")) is None:
            continue
        if e.get("event") == "command_start":
            out.append({"start": e["time"], "end": None, "last": e["time"]})
        elif out:
            out[-1]["last"] = e["time"]
            if e.get("event") == "command_end":
                out[-1]["end"] = e["time"]
    return out


def _hosts_expected(cluster: dict) -> Optional[int]:
    hosts = cluster.get("hosts")
    if hosts is None and cluster.get("accelerator_type"):
        from cluster.catalog import CatalogError, lookup

        try:
            hosts = lookup(str(cluster["accelerator_type"])).hosts
        except CatalogError:
            return None
    return int(hosts) * int(cluster.get("num_slices") or 1) if isinstance(hosts, int) else None


def _eta(steps: List[dict], total: Optional[int]) -> Optional[float]:
    """Seconds to `total` at the rate of the latest logged steps (the tail where steps still go up)."""
    tail = steps[-6:]
    for n in range(len(tail) - 1, 0, -1):
        if tail[n]["step"] <= tail[n - 1]["step"]:  # a restart resumed from an older step: rate from here on
            tail = tail[n:]
            break
    if total is None or len(tail) < 2:
        return None
    dt, ds = tail[-1]["time"] - tail[0]["time"], tail[-1]["step"] - tail[0]["step"]
    if dt <= 0 or ds <= 0:
        return None
    return max(0.0, (total - tail[-1]["step"]) * dt / ds)


def _cloud(cfg: dict, launches: List[dict], live: bool, now: float) -> dict:
    """The run's queued resource, its state from the TPU API, and its cost so far at list price."""
    from cluster import catalog

    c, name = cfg.get("cluster") or {}, (cfg.get("run") or {}).get("name") or ""
    out = {"queued_resource": None, "state": None, "nodes": {}, "cost_usd": None, "price_per_hour_usd": None}
    try:
        rates = catalog.cost_per_hour(str(c.get("accelerator_type")), int(c.get("num_slices") or 1),
                                      on_demand=c.get("price_on_demand"), spot=c.get("price_spot"))
        rate = rates["spot" if c.get("capacity") == "spot" else "on_demand"]
        up_s = sum((l["end"] or (now if live else l["last"])) - l["start"] for l in launches)
        out["price_per_hour_usd"], out["cost_usd"] = round(rate, 4), round(rate * max(0.0, up_s) / 3600.0, 2)
    except (catalog.CatalogError, TypeError, ValueError) as e:
        out["cost_usd_error"] = first_line(e)
    try:
        from google.api_core import exceptions as gexc

        from cluster.gcp import GcpTpuProvider, make_client

        provider = GcpTpuProvider(str(c.get("project")), str(c.get("zone")),
                                  client=make_client(c.get("tpu_api_endpoint")))
        out["queued_resource"] = provider.qr_id(name)
        try:
            qr = provider.client.get_queued_resource(name=provider.qr_name(name), retry=None, timeout=API_TIMEOUT_S)
        except gexc.NotFound:
            out["state"] = "NOT_FOUND"
            return out
        out["state"] = getattr(qr.state.state, "name", str(qr.state.state))
        out["nodes"] = provider.node_states(name)
    except Exception as e:  # noqa: BLE001 - no credentials, API down or refusing: the row says so, no traceback
        out["state"] = f"unknown ({first_line(e)})"
    return out


def run_status(run_dir: str, now: Optional[float] = None) -> dict:
    """The status of one run, as the --json object."""
    refresh(run_dir)
    now = time.time() if now is None else now
    cfg = runfiles.read_config(run_dir)
    cluster = cfg.get("cluster") or {}
    total = (cfg.get("trainer") or {}).get("steps")
    live = RunDir(run_dir).is_locked()
    summary = runfiles.read_json(runfiles.path(run_dir, runfiles.SUMMARY))
    summary = summary if isinstance(summary, dict) else {}
    events = runfiles.read_jsonl(runfiles.path(run_dir, runfiles.EVENTS))
    launches = _launches(events)
    ended = bool(launches) and launches[-1]["end"] is not None
    metrics = runfiles.read_jsonl(runfiles.path(run_dir, runfiles.METRICS))
    steps = [m for m in metrics if "split" not in m and _num(m.get("step")) is not None
             and _num(m.get("time")) is not None]
    last = steps[-1] if steps else {}

    beats = heartbeats(run_dir)
    attempts = [hb["attempt"] for hb in beats.values() if isinstance(hb.get("attempt"), int)]
    current = [hb for hb in beats.values() if attempts and hb.get("attempt") == max(attempts)]
    period = float((cfg.get("watchdog") or {}).get("heartbeat_s") or 1.0)
    # A cloud run's heartbeats here are as of its mirror's last push from the head (launcher/mirror.py): aged from then
    mirrored_at = mirror.pulled_at(run_dir) if cluster.get("provider", "local") != "local" else None
    beat_times = [hb["time"] for hb in current if _num(hb.get("time")) is not None]
    seen = now if mirrored_at is None else min(now, max([mirrored_at, *beat_times]))
    ages = [seen - t for t in beat_times]
    alive_ages = [seen - hb["time"] for hb in current if not hb.get("exit") and _num(hb.get("time")) is not None
                  and seen - hb["time"] <= STALE_BEATS * period]
    expected = _hosts_expected(cluster) or len(current) or None

    cloud = None
    if cluster.get("provider", "local") != "local":
        cloud = _cloud(cfg, launches, live or not ended, now)

    if live or (cloud is not None and not ended and str(cloud["state"]) in ("ACTIVE", "PROVISIONING",
                                                                              "WAITING_FOR_RESOURCES", "ACCEPTED")):
        state = RUNNING
        since = launches[-1]["start"] if launches else 0.0
        failures = [e for e in events if e.get("event") == "failure" and e.get("host") == "launcher"
                    and (_num(e.get("time")) or 0) >= since]
        if failures:
            after = failures[-1].get("attempt")
            training = [hb for hb in current if isinstance(after, int) and hb.get("attempt", -1) > after
                        and not hb.get("exit") and hb.get("phase") not in runfiles.STARTUP_PHASES]
            if len(training) < (expected or 1):
                state = RESTARTING
    elif ended or (not launches and summary):
        state = summary.get("status") or "failed"
    elif launches:
        state = LOST
    else:
        state = NOT_STARTED

    step_candidates = [_num(last.get("step")), _num(summary.get("final_step")) if ended else None]
    step_candidates += [_num(hb.get("step")) for hb in current]
    step = max((s for s in step_candidates if s is not None), default=None)
    ledger = goodput.summarize(runfiles.read_jsonl(runfiles.path(run_dir, runfiles.GOODPUT)),
                               now if state in (RUNNING, RESTARTING) else 0.0)
    restarts = {k: v for k, v in ledger["restarts"].items() if k != "total"}
    return {
        "name": os.path.basename(run_dir), "dir": run_dir, "state": state,
        "step": int(step) if step is not None else None, "total": total,
        "loss": last.get("loss"), "tokens_per_s": last.get("tokens_per_s"), "mfu": last.get("mfu"),
        "eta_s": round(e, 1) if state == RUNNING and (e := _eta(steps, total)) is not None else None,
        "goodput": ledger["goodput"] if ledger["attempts"] else None,
        "restarts": restarts,
        "hosts_alive": len(alive_ages), "hosts": expected,
        "heartbeat_age_s": round(max(alive_ages), 1) if alive_ages else (round(min(ages), 1) if ages else None),
        "provider": cluster.get("provider", "local"), "cloud": cloud,
        "mirror_age_s": round(now - mirrored_at, 1) if mirrored_at is not None else None,
    }


def _duration(s: Optional[float]) -> str:
    if s is None:
        return "-"
    if s < 10:
        return f"{s:.1f}s"
    if s < 120:
        return f"{s:.0f}s"
    if s < 7200:
        return f"{s / 60:.0f}m"
    return f"{s / 3600:.1f}h" if s < 172800 else f"{s / 86400:.1f}d"


def _cells(st: dict) -> List[str]:
    def num(x, fmt):
        return format(x, fmt) if _num(x) is not None else "-"

    hosts = f"{st['hosts_alive']}/{st['hosts'] if st['hosts'] is not None else '?'}"
    if st["heartbeat_age_s"] is not None:
        hosts += f" ({_duration(st['heartbeat_age_s'])})"
    restarts = " ".join(f"{k}:{v}" for k, v in sorted(st["restarts"].items())) or "0"
    cells = [st["name"], st["state"], f"{st['step'] if st['step'] is not None else '-'}/{st['total'] or '-'}",
             num(st["loss"], ".4f"), num(st["tokens_per_s"], ",.0f"), num(st["mfu"], ".1%"),
             _duration(st["eta_s"]), num(st["goodput"], ".2f"), restarts, hosts]
    c = st["cloud"]
    if c is not None:
        cost = f"${c['cost_usd']:,.2f}" if c.get("cost_usd") is not None else "-"
        cells.append(f"{c['queued_resource'] or '-'} {c['state']} {cost}")
    else:
        cells.append("-")
    return cells


HEADER = ["RUN", "STATE", "STEP", "LOSS", "TOK/S", "MFU", "ETA", "GOODPUT", "RESTARTS", "HOSTS", "CLOUD"]


def render(statuses: List[dict]) -> str:
    rows = [HEADER] + [_cells(st) for st in statuses]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows)


def _once(args) -> None:
    dirs = [resolve_run(r, args.root) for r in args.runs] if args.runs else all_runs(args.root)
    statuses = [run_status(d) for d in dirs]
    if args.json:
        text = "\n".join(json.dumps(st, sort_keys=True) for st in statuses)
    elif statuses:
        text = render(statuses)
    else:
        text = f"no runs under {os.path.abspath(args.root)}"
    if args.watch is not None and sys.stdout.isatty():
        sys.stdout.write("\033[H\033[2J")  # clear the screen: the table redraws in place
    print(text, flush=True)


def run(args) -> int:
    if args.watch is None:
        _once(args)
        return 0
    try:
        while True:
            _once(args)
            time.sleep(max(0.1, args.watch))
    except KeyboardInterrupt:
        return 0
