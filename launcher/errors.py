"""User-facing errors: one line naming the config key and the fix, exit code 2."""
from trainer.errors import first_line  # noqa: F401 - the one helper; the launcher's modules take it from here


class UserError(Exception):
    """Bad input from the user (config, data, checkpoint, credentials). Printed as one line, exit 2."""

    def __init__(self, key: str, problem: str, fix: str = ""):
        self.key, self.problem, self.fix = key, problem, fix
        msg = f"{key}: {problem}"
        if fix:
            msg += f" ({fix})"
        super().__init__(msg)


