"""cluster.secrets: the run's Ray token through Secret Manager, with the real client against a local server."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from google.api_core import exceptions as gexc

import secret_manager_server
from cluster.gcp import CREDENTIALS_HINT, ProvisionError
from cluster.secrets import ACCESSOR_ROLE, RunSecret, make_secret_client, secret_id, write_token_file
from secret_manager_server import SecretManagerServer

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "rAy-T0ken-5ecret-8c1f0a"
VM_SA = "tpu-vm@proj.iam.gserviceaccount.com"
HEAD_SA = "head-vm@proj.iam.gserviceaccount.com"


@pytest.fixture()
def server():
    with SecretManagerServer() as srv:
        yield srv


@pytest.fixture()
def lines() -> list[str]:
    return []


@pytest.fixture()
def store(server: SecretManagerServer, lines: list[str]) -> RunSecret:
    return RunSecret("proj", endpoint=server.url, progress=lines.append)


def cli(server: SecretManagerServer, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "cluster.secrets", "fetch", "--project", "proj",
                           "--endpoint", server.url, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_secret_id_is_valid_and_derived_from_the_tpu_name() -> None:
    assert secret_id("demo") == "demo-ray-token"
    for run in ("My Run/2024.05", "9lives", "x" * 200, "a__b"):
        sid = secret_id(run)
        assert sid.endswith("-ray-token") and len(sid) <= 255
        assert all(c.isalnum() or c in "-_" for c in sid), sid


def test_put_access_round_trip(server: SecretManagerServer, store: RunSecret, lines: list[str]) -> None:
    name = store.put("demo", TOKEN, [VM_SA, HEAD_SA], labels={"team": "ml"})
    assert name == "projects/proj/secrets/demo-ray-token"
    assert store.access("demo") == TOKEN
    assert store.access(name) == TOKEN  # a full resource name works too
    record = server.secrets[name]
    assert record["json"]["replication"] == {"automatic": {}}
    assert record["json"]["labels"] == {"team": "ml", "launcher-run": "demo"}
    assert server.payloads(name) == [TOKEN.encode()]
    # the token went out in the addVersion body only, and never into a progress line
    assert [m for m, _ in server.mentions(TOKEN.encode())] == ["POST"]
    assert all(":addVersion" in target for _, target in server.mentions(TOKEN.encode()))
    assert lines and not any(TOKEN in line for line in lines)


def test_put_twice_adds_a_version_and_access_returns_the_newest(server: SecretManagerServer,
                                                                 store: RunSecret, lines: list[str]) -> None:
    store.put("demo", TOKEN, [VM_SA])
    store.put("demo", TOKEN + "-rotated", [VM_SA])
    name = store.name("demo")
    assert server.payloads(name) == [TOKEN.encode(), (TOKEN + "-rotated").encode()]
    assert len(server.secrets) == 1
    assert store.access("demo") == TOKEN + "-rotated"
    assert server.count("POST", "/secrets") == 2  # the second create got 409 and the secret was reused
    assert any("reusing secret" in line for line in lines)
    assert not any(TOKEN in line for line in lines)


def test_iam_policy_lists_exactly_the_accessors(server: SecretManagerServer, store: RunSecret) -> None:
    name = store.put("demo", TOKEN, [VM_SA, HEAD_SA, VM_SA])
    policy = server.policy(name)
    assert policy["bindings"] == [{"role": ACCESSOR_ROLE,
                                   "members": sorted([f"serviceAccount:{HEAD_SA}", f"serviceAccount:{VM_SA}"])}]
    # the policy is replaced, not merged: a later put with other accessors drops the old ones
    store.put("demo", TOKEN, [HEAD_SA])
    assert server.policy(name)["bindings"] == [{"role": ACCESSOR_ROLE, "members": [f"serviceAccount:{HEAD_SA}"]}]
    assert store.client.get_iam_policy(request={"resource": name}).bindings[0].members == [
        f"serviceAccount:{HEAD_SA}"]


def test_put_refuses_no_accessors_or_bad_emails(server: SecretManagerServer, store: RunSecret) -> None:
    with pytest.raises(ValueError, match="no service account"):
        store.put("demo", TOKEN, [])
    with pytest.raises(ValueError, match="not a service-account email"):
        store.put("demo", TOKEN, ["allUsers"])
    assert server.secrets == {} and server.bodies == []


def test_delete_then_access_is_a_clear_error(server: SecretManagerServer, store: RunSecret,
                                             lines: list[str]) -> None:
    store.put("demo", TOKEN, [VM_SA])
    assert store.delete("demo") is True
    assert server.secrets == {}
    with pytest.raises(gexc.NotFound, match="demo-ray-token"):
        store.access("demo")
    assert store.delete("demo") is False  # missing is fine
    assert not any(TOKEN in line for line in lines)


def test_access_checks_the_payload_crc32c(server: SecretManagerServer, store: RunSecret,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    store.put("demo", TOKEN, [VM_SA])
    monkeypatch.setattr(secret_manager_server, "crc32c", lambda data: 12345)  # the server now lies
    with pytest.raises(ProvisionError, match="CRC32C") as info:
        store.access("demo")
    assert TOKEN not in str(info.value)


def test_missing_credentials_raise_the_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError

    def no_credentials(*args, **kwargs):
        raise DefaultCredentialsError("none")

    monkeypatch.setattr(google.auth, "default", no_credentials)
    with pytest.raises(ProvisionError) as info:
        make_secret_client()
    assert str(info.value) == CREDENTIALS_HINT


def test_write_token_file_is_0600_atomic_and_replaces(tmp_path: Path) -> None:
    old_umask = os.umask(0)  # even with a permissive umask
    try:
        out = tmp_path / "fresh" / "ray" / "token"
        write_token_file(str(out), TOKEN)
        assert out.read_text() == TOKEN
        assert stat.S_IMODE(out.stat().st_mode) == 0o600
        assert stat.S_IMODE(out.parent.stat().st_mode) == 0o700
        existing = tmp_path / "existing"
        existing.write_text("old")
        existing.chmod(0o644)
        write_token_file(str(existing), TOKEN)
        assert existing.read_text() == TOKEN and stat.S_IMODE(existing.stat().st_mode) == 0o600
        assert sorted(p.name for p in tmp_path.iterdir()) == ["existing", "fresh"]  # no temp file left
    finally:
        os.umask(old_umask)


def test_cli_fetch_writes_0600_and_never_prints_the_token(server: SecretManagerServer, store: RunSecret,
                                                          tmp_path: Path) -> None:
    store.put("demo", TOKEN, [VM_SA])
    out = tmp_path / "ray" / "auth_token"
    result = cli(server, "--secret", secret_id("demo"), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"[secrets] wrote the Ray token to {out}\n"
    assert TOKEN not in result.stdout + result.stderr
    assert out.read_text() == TOKEN
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert stat.S_IMODE(out.parent.stat().st_mode) == 0o700


def test_cli_missing_secret_exits_2_with_one_line(server: SecretManagerServer, tmp_path: Path) -> None:
    out = tmp_path / "token"
    result = cli(server, "--secret", "nope-ray-token", "--out", str(out))
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "nope-ray-token" in result.stderr and "NotFound" in result.stderr
    assert not out.exists()


def test_cli_denied_then_waits_out_iam_propagation(server: SecretManagerServer, store: RunSecret,
                                                   tmp_path: Path) -> None:
    store.put("demo", TOKEN, [VM_SA])
    server.caller = "someone-else@proj.iam.gserviceaccount.com"  # not in the policy: 403
    result = cli(server, "--secret", secret_id("demo"), "--out", str(tmp_path / "token"))
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1
    assert "demo-ray-token" in result.stderr and "Forbidden" in result.stderr
    assert TOKEN not in result.stdout + result.stderr
    assert server.denied == [store.name("demo")]

    server.caller = VM_SA  # the VM's own account, but IAM has not caught up for the first two reads
    refusals = iter([False, False])
    server.access_allowed = lambda name: next(refusals, True)
    result = cli(server, "--secret", secret_id("demo"), "--out", str(tmp_path / "token"),
                 "--wait-s", "30", "--poll-s", "0.05")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "token").read_text() == TOKEN
    assert TOKEN not in result.stdout + result.stderr
