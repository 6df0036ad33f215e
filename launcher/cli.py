"""`tpu-launch`: the launch (`tpu-launch [overrides...]`, the same as `python -m launcher`) and the run commands.

  tpu-launch status [RUN...]     one row per run: state, step, loss, tokens/s, MFU, ETA, goodput, restarts, hosts
  tpu-launch logs RUN            a host's log (--host I, --follow), or the host that failed first (--first-error)
  tpu-launch stop RUN            checkpoint at one agreed step on every host and stop (as Ctrl-C in its terminal)
  tpu-launch down RUN            delete what the run left in the cloud (checkpoints and data stay)
  tpu-launch report RUN          write the run's report.png again and print its summary
  tpu-launch generate RUN        continue prompts with the run's trained model (--prompt TEXT; KV-cache decoding)
  tpu-launch eval RUN            loss, perplexity, token and top-5 accuracy of a checkpoint on a split (--split, --data)

RUN is a run directory or a run name under --root (default: runs). `tpu-launch COMMAND --help` for its options.
"""
import argparse
import importlib
import sys
from typing import List, Optional

from trainer.runfiles import EXIT_USER_ERROR

COMMANDS = ("status", "logs", "stop", "down", "report", "generate", "eval")


def _parser(command: str) -> argparse.ArgumentParser:
    """The parser of one command: only its module is imported, so a quick command (status) never pays for the
    imports of a heavy one (report's matplotlib, stop's and down's cloud clients)."""
    p = argparse.ArgumentParser(prog="tpu-launch", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    mod = importlib.import_module(f"launcher.commands.{command}")
    cp = sub.add_parser(command, help=mod.HELP, description=mod.__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    mod.add_arguments(cp)
    cp.set_defaults(run_command=mod.run)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and not argv[0].startswith(("-", "~")) and "=" not in argv[0]:
        # Every override has a '=' (or is a ~deletion): a bare word is a mistyped command.
        print(f"error: COMMAND: unknown command '{argv[0]}' (one of: {', '.join(COMMANDS)}; a launch takes "
              "key=value overrides)", file=sys.stderr)
        return EXIT_USER_ERROR
    if not argv or argv[0] not in COMMANDS:
        if argv and argv[0] in ("-h", "--help"):
            print(__doc__)
        from launcher.__main__ import main as launch

        return launch(argv)
    from launcher.errors import UserError

    args = _parser(argv[0]).parse_args(argv)
    try:
        return int(args.run_command(args) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
