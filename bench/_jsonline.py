"""Bench helper: a benchmark's `--json PATH` option and its last stdout line, one JSON object (also written to PATH).

    add_json_arg(parser)
    ...
    emit(result, args.json)   # a blank line, then the JSON line (keys sorted); PATH gets the same line
"""
import json
from typing import Optional


def add_json_arg(parser) -> None:
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the final JSON line to PATH")


def emit(result: dict, path: Optional[str]) -> str:
    """Print `result` as the run's last line, and write it to `path` when given; returns the line."""
    line = json.dumps(result, sort_keys=True)
    print()  # sets the line apart from the human-readable report above it
    print(line, flush=True)
    if path:
        with open(path, "w") as f:
            f.write(line + "\n")
    return line
