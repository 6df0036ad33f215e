"""Hydra's own flags for `python -m launcher` / `tpu-launch`: --help, --cfg, --info, --shell-completion, -m.

A launch composes its config through Hydra's Compose API (launcher/config.py) and -m runs each combination of a
sweep as its own launch (launcher/sweep.py); the informational flags go to `hydra.main` itself, so their output
is Hydra's (help template in conf/config.yaml). Bad overrides are still our one-line error, exit 2.
"""
import sys
from typing import List

from launcher.errors import UserError

SWEEP = ("-m", "--multirun")
HELP = ("-h", "--help", "--hydra-help", "--version")
CFG = ("-c", "--cfg")
INFO = ("-i", "--info")
COMPLETION = ("-sc", "--shell-completion")
CFG_TYPES = ("job", "hydra", "all")
INFO_TYPES = ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath")
# Flags that only shape what --cfg / --help print.
MODIFIERS = ("--resolve", "-p", "--package")
# What the launcher cannot honour: a launch reads conf/ only, and Hydra never runs its jobs.
REFUSED = {"-cp": "--config-path", "--config-path": "--config-path", "-cn": "--config-name",
           "--config-name": "--config-name", "-cd": "--config-dir", "--config-dir": "--config-dir",
           "-r": "--run", "--run": "--run", "--experimental-rerun": "--experimental-rerun"}


def is_flagged(argv: List[str]) -> bool:
    """Whether argv has a Hydra flag (an override never starts with '-')."""
    return any(a.startswith("-") for a in argv)


def main(argv: List[str]) -> int:
    flags = [a.split("=", 1)[0] for a in argv if a.startswith("-")]
    for flag in flags:
        if flag in REFUSED:
            raise UserError(REFUSED[flag], "is not supported by the launcher (its config is conf/ and overrides)",
                            "pass overrides instead, e.g. python -m launcher model=tiny")
        if flag not in SWEEP + HELP + CFG + INFO + COMPLETION + MODIFIERS:
            raise UserError(flag, "unknown flag",
                            "see python -m launcher --help (flags: --help, --cfg job, --info, -sc, -m)")
    if any(f in SWEEP for f in flags) and not any(f in HELP for f in flags):
        others = [f for f in flags if f not in SWEEP]
        if others:
            raise UserError(others[0], "cannot be combined with -m", "use it without -m, for one run's overrides")
        from launcher import sweep

        return sweep.run([a for a in argv if a not in SWEEP])
    return run_hydra(_normalized(argv))


def _normalized(argv: List[str]) -> List[str]:
    """Today's `--cfg` alone (then overrides) means `--cfg job --resolve`, the resolved job config; `--info`
    alone means `--info all`. Hydra's argparse would take the next override as their value and refuse it."""
    out: List[str] = []
    for i, a in enumerate(argv):
        out.append(a)
        following = argv[i + 1] if i + 1 < len(argv) else None
        if a in CFG and following not in CFG_TYPES:
            out += ["job", "--resolve"] if "--resolve" not in argv else ["job"]
        elif a in INFO and following not in INFO_TYPES:
            out.append("all")
    return out


def run_hydra(argv: List[str]) -> int:
    """Hand argv to `hydra.main` (Hydra reads sys.argv), after checking its overrides ourselves: a bad one is
    one line naming the key, exit 2, not Hydra's report and exit 1. Returns Hydra's exit code."""
    import hydra

    from launcher import schema
    from launcher.config import compose_config, with_default_cluster

    positional = _overrides(argv)
    completion = any(a in COMPLETION for a in argv)
    if not completion:  # -sc's positionals are its subcommand (install=bash, query=bash), not overrides
        compose_config(positional)
        argv = [a for a in argv if a not in positional] + with_default_cluster(positional)
    schema.register()

    @hydra.main(config_path="pkg://conf", config_name="config", version_base="1.3")
    def app(cfg) -> None:  # hydra.main needs a task; only run modes call it, and none reaches here
        raise AssertionError("hydra.main ran a job")

    saved = sys.argv
    sys.argv = ["tpu-launch", *argv]  # Hydra's completion script registers itself for basename(argv[0])
    try:
        app()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved
    return 0


def _overrides(argv: List[str]) -> List[str]:
    """The positional arguments: everything but the flags and their values."""
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a.startswith("-"):
            following = argv[i + 1] if i + 1 < len(argv) else None
            skip = ((a in CFG and following in CFG_TYPES) or (a in INFO and following in INFO_TYPES)
                    or a in ("-p", "--package"))
            continue
        out.append(a)
    return out
