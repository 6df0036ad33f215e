"""`python -m launcher -m OVERRIDES`: a Hydra sweep, each combination its own launch, one after another.

The overrides follow Hydra's sweep grammar (`a,b`, `range(...)`, `choice(...)`; the combinations are the product,
in the order typed, as Hydra's basic sweeper makes them). Every combination is composed and validated before the
first starts, so a bad value is one line, exit 2, and nothing is written. Each then runs as its own
`python -m launcher <its overrides>` process, because Ray reads its auth mode (the run's own token) once per
process and JAX/Ray state does not reset between runs; its output streams to this terminal.

Run names: `<run.name>-<key>=<value>[,<key>=<value>...]` over the swept keys, in the order typed (the key
without its +/~ prefix; run.name and run.dir themselves are left out; characters other than letters, digits and
`._=,+-` become `_`), so `-m trainer.seed=0,1` runs `default-trainer.seed=0` and `default-trainer.seed=1` in
runs/<name>. Typing the same sweep again resumes each run (a completed one prints its result).
"""
import itertools
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import List, Optional, Tuple

from launcher.errors import UserError
from trainer import runfiles

_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]")
_IDENTITY = ("run.name", "run.dir")


@dataclass
class SweepRun:
    name: str
    overrides: List[str]  # what its own `python -m launcher` gets
    run_dir: str = ""
    steps: int = 0


def expand(overrides: List[str]) -> List[Tuple[List[str], List[str]]]:
    """Each combination as (its overrides, its suffix items `key=value` of the swept keys)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from launcher.errors import first_line

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as e:
        raise UserError("overrides", first_line(e), "use key=value, key=a,b or key=range(0,3)") from None
    choices: List[List[Tuple[str, Optional[str]]]] = []  # per override: (override text, suffix item or None)
    for ov in parsed:
        if not ov.is_sweep_override():
            choices.append([(ov.input_line, None)])
            continue
        key = ov.key_or_group
        if not ov.is_discrete_sweep():
            raise UserError(key, f"'{ov.input_line}' is not a list of values", f"list them: {key}=a,b or range(0,3)")
        try:
            values = list(ov.sweep_string_iterator())
        except HydraException:  # glob(...): it expands against Hydra's config loader, inside its own sweeper only
            raise UserError(key, f"'{ov.input_line}' cannot be expanded here (glob)",
                            f"list the values: {key}=a,b") from None
        choices.append([(f"{ov.get_key_element()}={v}", None if key in _IDENTITY else f"{key}={v}")
                        for v in values])
    return [([text for text, _ in combo], [item for _, item in combo if item is not None])
            for combo in itertools.product(*choices)]


def plan(overrides: List[str]) -> List[SweepRun]:
    """Every run of the sweep, composed and validated (a UserError for the first bad one); distinct run dirs."""
    from launcher.config import compose_config
    from launcher.validate import validate

    runs: List[SweepRun] = []
    for combo, items in expand(overrides):
        base = str(compose_config(combo).run.name)
        name = _UNSAFE.sub("_", f"{base}-{','.join(items)}") if items else base
        # quoted: '=' and ',' are Hydra syntax in an unquoted value
        run = SweepRun(name, [*combo, f"run.name='{name}'"])
        cfg = compose_config(run.overrides)
        validate(cfg)
        run.run_dir, run.steps = os.path.abspath(str(cfg.run.dir)), int(cfg.trainer.steps)
        twin = next((r for r in runs if r.run_dir == run.run_dir), None)
        if twin is not None:
            raise UserError("run.dir", f"sweep runs {twin.name} and {name} would share {run.run_dir}",
                            "leave run.dir at its default runs/${run.name}, or use ${run.name} in it")
        runs.append(run)
    return runs


def run(overrides: List[str]) -> int:
    """Run the sweep; one summary line per run at the end. Exit 0 if every run completed, else the first failed
    run's exit code. Ctrl-C reaches the running launch too (it stops with a checkpoint); no further run starts."""
    runs = plan(overrides)
    n = len(runs)
    outcomes: List[Optional[Tuple[int, float]]] = [None] * n
    interrupted = False
    try:
        for i, r in enumerate(runs):
            # the run.name override last, double-quoted: its name holds only [A-Za-z0-9._=,+-] and its own quotes
            shown = " ".join([*map(shlex.quote, r.overrides[:-1]), f'"{r.overrides[-1]}"'])
            print(f"[launcher] sweep run {i + 1}/{n}: {r.name}: python -m launcher {shown}", flush=True)
            started = time.time()
            proc = subprocess.Popen([sys.executable, "-m", "launcher", *r.overrides])
            code, interrupted = _wait(proc)
            outcomes[i] = (code, started)
            if interrupted:
                break
    except KeyboardInterrupt:  # between two runs
        interrupted = True
    if interrupted:
        print("[launcher] sweep interrupted: no further run starts", flush=True)
    print(f"[launcher] sweep of {n} runs:", flush=True)
    for i, r in enumerate(runs):
        print(f"[launcher]   {i + 1}/{n} {_line(r, outcomes[i])}", flush=True)
    codes = [o[0] for o in outcomes if o is not None]
    failed = [c for c in codes if c != runfiles.EXIT_OK]
    if failed:
        return failed[0]
    return runfiles.EXIT_OK if len(codes) == n else runfiles.EXIT_FAILED


def _wait(proc: subprocess.Popen) -> Tuple[int, bool]:
    """(the launch's exit code, whether Ctrl-C was pressed). A Ctrl-C reaches the launch as well (same terminal):
    it stops with a checkpoint, and we wait for that, however often Ctrl-C is pressed."""
    interrupted = False
    while True:
        try:
            return proc.wait(), interrupted
        except KeyboardInterrupt:
            interrupted = True


def _line(r: SweepRun, outcome: Optional[Tuple[int, float]]) -> str:
    """status, final step, loss and run dir of one run, from its summary.json (written by its launch)."""
    if outcome is None:
        return f"not started: {r.run_dir}"
    code, started = outcome
    summary = runfiles.read_json(runfiles.path(r.run_dir, runfiles.SUMMARY))
    try:
        fresh = os.path.getmtime(runfiles.path(r.run_dir, runfiles.SUMMARY)) >= started
    except OSError:
        fresh = False
    # A completed run typed again keeps its summary (no launch); any other stale summary is not this launch's.
    if not isinstance(summary, dict) or not (fresh or code == runfiles.EXIT_OK):
        # e.g. a dry run (plan.json only), or a launch that stopped before its summary
        return f"{'failed' if code else 'ended'} (exit {code}) without a summary: {r.run_dir}"
    loss = summary.get("final_loss")
    loss_text = f"{loss:.4f}" if isinstance(loss, (int, float)) and not isinstance(loss, bool) else "n/a"
    status = str(summary.get("status"))
    if code != runfiles.EXIT_OK and status == "completed":
        status = f"failed (exit {code})"
    step = summary.get("final_step")
    if step is None:  # a stopped launch names the step its hosts saved
        step = summary.get("stopped_at_step")
    return f"{status}: step {'n/a' if step is None else step}/{r.steps}, loss {loss_text}: {r.run_dir}"
