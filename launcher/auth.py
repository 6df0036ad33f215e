"""The run's Ray token: made once per run, kept 0600 in the run's record, given to Ray through env vars only.

Ray 2.60 token auth (`RAY_AUTH_MODE=token`, `RAY_AUTH_TOKEN_PATH`) guards every gRPC port and the dashboard's
HTTP API (the job server). Each cluster the launcher creates gets the run's own token: the local pod's head and
nodes inherit it from this process's environment, and cloud VMs fetch it from Secret Manager
(`cluster/secrets.py`). A cluster the user names with `ray.address` is joined with the token the user supplies.
The token itself is never printed, logged, or written anywhere but its own file (and Secret Manager).
"""
import os
import secrets
from typing import Optional, Tuple

from cluster.secrets import write_token_file
from launcher.errors import UserError, first_line

RECORD_DIR = "auth"  # ${run.dir}/auth, mode 0700: the run's token, SSH key pair and pinned head host key
TOKEN_FILE = "ray_token"
MODE_ENV, TOKEN_ENV, TOKEN_PATH_ENV = "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"


def record_dir(run_dir: str) -> str:
    """`${run.dir}/auth`, created with mode 0700 (and tightened to it if it existed looser)."""
    path = os.path.join(os.path.abspath(run_dir), RECORD_DIR)
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def run_token_file(run_dir: str) -> str:
    """The run's token file, made on first use (256 random bits) and reused by every later launch of the run."""
    path = os.path.join(record_dir(run_dir), TOKEN_FILE)
    if not os.path.exists(path) or not read_token(path):
        write_token_file(path, secrets.token_hex(32))
    os.chmod(path, 0o600)
    return path


def read_token(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def use_token_file(path: str) -> None:
    """Point this process (and every Ray process it starts) at the token in `path`."""
    os.environ[MODE_ENV] = "token"
    os.environ[TOKEN_PATH_ENV] = os.path.abspath(path)
    os.environ.pop(TOKEN_ENV, None)  # would take precedence over the file


def user_token(token_file: Optional[str]) -> Tuple[str, str, Optional[str]]:
    """(token, where it came from, its file or None for RAY_AUTH_TOKEN) for a cluster the user named
    (`ray.address`): `ray.auth_token_file`, else RAY_AUTH_TOKEN, else RAY_AUTH_TOKEN_PATH, else Ray's default
    ~/.ray/auth_token. UserError if none."""
    if token_file:
        path = os.path.abspath(os.path.expanduser(str(token_file)))
        return _read_user_token(path, "ray.auth_token_file", required=True), "ray.auth_token_file", path
    if os.environ.get(TOKEN_ENV, "").strip():
        return os.environ[TOKEN_ENV].strip(), TOKEN_ENV, None
    if os.environ.get(TOKEN_PATH_ENV):
        path = os.path.abspath(os.environ[TOKEN_PATH_ENV])
        return _read_user_token(path, TOKEN_PATH_ENV, required=True), TOKEN_PATH_ENV, path
    path = os.path.expanduser("~/.ray/auth_token")
    token = _read_user_token(path, "~/.ray/auth_token", required=False)
    if token:
        return token, "~/.ray/auth_token", path
    raise UserError("ray.auth_token_file", "no Ray token for the cluster at ray.address (the launcher joins only "
                    "clusters with token authentication)", "start that cluster with RAY_AUTH_MODE=token and set "
                    "RAY_AUTH_TOKEN_PATH or ray.auth_token_file to its token file")


def _read_user_token(path: str, source: str, required: bool) -> str:
    key = "ray.auth_token_file" if source == "ray.auth_token_file" else "ray.address"
    try:
        token = read_token(path)
    except OSError as e:
        if not required:
            return ""
        raise UserError(key, f"cannot read the Ray token file {path} ({source}): {e.strerror}",
                        "point it at the cluster's token file") from None
    if not token and required:
        raise UserError(key, f"the Ray token file {path} ({source}) is empty", "point it at the cluster's token file")
    return token


def use_user_token(token_file: Optional[str]) -> Tuple[str, str]:
    """Set this process up to join the user's cluster with the token they supplied; (token, its source)."""
    token, source, path = user_token(token_file)
    if path is None:  # RAY_AUTH_TOKEN itself, which Ray reads
        os.environ[MODE_ENV] = "token"
    else:
        use_token_file(path)
    return token, source


def refused(address: str, source: str) -> UserError:
    """The one line for a cluster that refused our token."""
    return UserError("ray.address", f"the Ray cluster at {address} refused the token from {source}",
                     "use that cluster's token: set RAY_AUTH_TOKEN_PATH or ray.auth_token_file to its token file")


def is_auth_error(exc: BaseException) -> bool:
    """Whether `exc` (from ray.init or the job client) is Ray refusing our token."""
    from ray.exceptions import AuthenticationError

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, AuthenticationError):
            return True
        text = str(exc)
        if "authentication token is invalid" in text or "Unauthenticated" in text or "401" in text[:200]:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def probe(address: str, token: str, timeout_s: float = 10.0) -> str:
    """Ask the cluster's GCS at `address` (host:port) whether it accepts `token`: "ok", "refused" or
    "unreachable". One plain gRPC call (GetClusterId, an empty request) with the token as Ray sends it, so a
    refusal is told apart from a cluster that is not up, which `ray.init` reports alike after ~20 s of retries."""
    import grpc

    channel = grpc.insecure_channel(address)
    try:
        call = channel.unary_unary("/ray.rpc.NodeInfoGcsService/GetClusterId",
                                   request_serializer=lambda b: b, response_deserializer=lambda b: b)
        call(b"", timeout=timeout_s, metadata=(("authorization", f"Bearer {token}"),), wait_for_ready=True)
        return "ok"
    except grpc.RpcError as e:
        return "refused" if e.code() == grpc.StatusCode.UNAUTHENTICATED else "unreachable"
    finally:
        channel.close()


def check_user_cluster(address: str, token_file: Optional[str]) -> str:
    """Before anything is provisioned: the user's cluster at `ray.address` accepts the token they supplied.
    Sets this process up to use it and returns its source; UserError (one line) if it is refused."""
    token, source = use_user_token(token_file)
    if probe(address.split("://")[-1], token) == "refused":
        raise refused(address, source)
    return source


def current_token() -> str:
    """The token this process was set up with (use_token_file / use_user_token)."""
    if os.environ.get(TOKEN_ENV, "").strip():
        return os.environ[TOKEN_ENV].strip()
    return read_token(os.environ[TOKEN_PATH_ENV])


def token_accessors(cfg, say=print) -> list:
    """Who may read the run's token in Secret Manager: the run's service account only. Unset, that is the
    project's default compute account, which is broad: say so in one line."""
    c = cfg.cluster
    if c.service_account:
        return [str(c.service_account)]
    from cluster.head_vm import default_service_account

    account = default_service_account(str(c.project), c.compute_api_endpoint)
    say(f"warning: cluster.service_account is unset, so the VMs run as the default compute service account "
        f"{account}, which holds broad project roles: create a narrow one (README: Security) and set "
        f"cluster.service_account")
    return [account]


def publish(cfg, say=print) -> str:
    """Before any cloud VM is created: the run's Ray token into its Secret Manager secret (cluster/secrets.py),
    readable by the run's service account only. Returns the secret's resource name."""
    from cluster.secrets import RunSecret

    from google.api_core import exceptions as gexc

    from cluster.gcp import ProvisionError

    c = cfg.cluster
    secret = RunSecret(str(c.project), endpoint=c.secret_manager_endpoint, progress=lambda m: None)
    try:
        name = secret.put(cfg.run.name, current_token(), token_accessors(cfg, say), dict(c.labels))
    except (ProvisionError, gexc.GoogleAPICallError, ValueError) as e:
        raise UserError("cluster.project", f"could not store the run's Ray token in Secret Manager: {first_line(e)}",
                        "enable the Secret Manager API and give your account roles/secretmanager.admin "
                        "(README: Security)") from None
    say(f"[launcher] the run's Ray token is in Secret Manager as {name} (readable by the run's service account)")
    return name


def unpublish(cfg, say=print) -> None:
    """After the run: delete its secret (cloud runs with cluster.delete_on_exit); a missing one is fine."""
    from cluster.secrets import RunSecret

    from google.api_core import exceptions as gexc

    from cluster.gcp import ProvisionError

    c = cfg.cluster
    secret = RunSecret(str(c.project), endpoint=c.secret_manager_endpoint, progress=lambda m: None)
    try:
        if secret.delete(cfg.run.name):
            say("[launcher] deleted the run's Ray token secret")
    except (ProvisionError, gexc.GoogleAPICallError) as e:  # cleanup: said, not raised, the run's outcome stands
        say(f"warning: could not delete the run's Ray token secret {secret.name(cfg.run.name)}: {first_line(e)}")


def token_source() -> str:
    """Where this process's token comes from, for messages (never the token itself)."""
    if os.environ.get(TOKEN_ENV, "").strip():
        return TOKEN_ENV
    return os.environ.get(TOKEN_PATH_ENV, "no token")
