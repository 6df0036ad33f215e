"""Write the run's report again, ${run.dir}/report.png, and print its text summary.

The report (launcher/report.py) is drawn from the run directory alone: train loss and the val/test eval curves
by step, tokens/s over time since the first launch, the failures and restarts where they happened, and the
goodput breakdown (productive time and each badput bucket). The launcher draws it at the end of every run;
this draws it again, e.g. for a live run, or one whose supervisor died.
"""
from launcher import report
from launcher.commands.common import add_root, refresh, resolve_run

HELP = "write the run's report.png again and print its summary"


def add_arguments(p) -> None:
    p.add_argument("run", metavar="RUN", help="a run directory or a run name under --root")
    add_root(p)


def run(args) -> int:
    print("\n".join(report.write(refresh(resolve_run(args.run, args.root)))))
    return 0
