"""`tpu-launch`: the commands' dispatcher (launcher/cli.py)."""
from launcher.cli import COMMANDS
from podutil import tpu_launch


def test_help_lists_the_commands():
    proc = tpu_launch("--help", timeout=120)
    assert proc.returncode == 0, proc.stderr
    for command in ("status", "logs", "stop", "down", "report"):
        assert f"tpu-launch {command}" in proc.stdout
    assert "Configuration groups" in proc.stdout  # then the launch's own (Hydra's) help


def test_a_mistyped_command_is_one_line_exit_2():
    proc = tpu_launch("statsu", timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: COMMAND: unknown command 'statsu' (one of: {', '.join(COMMANDS)}; a launch takes "
        "key=value overrides)"]
    assert COMMANDS[:5] == ("status", "logs", "stop", "down", "report")


def test_each_command_has_its_help():
    for command in ("status", "logs", "stop", "down", "report"):
        proc = tpu_launch(command, "--help", timeout=60)
        assert proc.returncode == 0 and f"usage: tpu-launch {command}" in proc.stdout, (command, proc.stderr)
