"""Unit tests for launcher/auth.py: the run's token record, and which token a cluster named by ray.address gets."""
import os
import stat

import pytest

from launcher import auth
from launcher.errors import UserError


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for name in (auth.MODE_ENV, auth.TOKEN_ENV, auth.TOKEN_PATH_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return monkeypatch


def test_run_token_is_made_once_0600_in_a_0700_record(tmp_path, clean_env):
    run_dir = tmp_path / "run"
    path = auth.run_token_file(str(run_dir))
    token = auth.read_token(path)
    assert len(token) == 64 and int(token, 16) >= 0
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(run_dir / "auth").st_mode) == 0o700
    assert auth.read_token(auth.run_token_file(str(run_dir))) == token  # reused by later launches
    os.chmod(run_dir / "auth", 0o755)
    os.chmod(path, 0o644)
    auth.run_token_file(str(run_dir))  # a loosened record is tightened again
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(run_dir / "auth").st_mode) == 0o700
    auth.use_token_file(path)
    assert os.environ[auth.MODE_ENV] == "token" and os.environ[auth.TOKEN_PATH_ENV] == path
    assert auth.current_token() == token and auth.token_source() == path


def test_user_token_precedence(tmp_path, clean_env):
    config_file, env_file = tmp_path / "from-config", tmp_path / "from-env"
    config_file.write_text("a" * 64 + "\n")
    env_file.write_text("b" * 64)
    home = tmp_path / "home" / ".ray"
    home.mkdir(parents=True)
    (home / "auth_token").write_text("c" * 64)
    assert auth.user_token(None)[:2] == ("c" * 64, "~/.ray/auth_token")
    clean_env.setenv(auth.TOKEN_PATH_ENV, str(env_file))
    assert auth.user_token(None) == ("b" * 64, auth.TOKEN_PATH_ENV, str(env_file))
    clean_env.setenv(auth.TOKEN_ENV, "d" * 64)
    assert auth.user_token(None) == ("d" * 64, auth.TOKEN_ENV, None)
    assert auth.user_token(str(config_file)) == ("a" * 64, "ray.auth_token_file", str(config_file))
    assert auth.use_user_token(str(config_file)) == ("a" * 64, "ray.auth_token_file")
    assert os.environ[auth.TOKEN_PATH_ENV] == str(config_file) and os.environ[auth.MODE_ENV] == "token"
    assert auth.TOKEN_ENV not in os.environ  # Ray would prefer it over the file the user named
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(UserError, match="is empty"):
        auth.user_token(str(empty))


def test_no_or_unreadable_user_token_is_one_line(tmp_path, clean_env):
    with pytest.raises(UserError) as none:
        auth.user_token(None)
    assert none.value.key == "ray.auth_token_file" and "no Ray token" in str(none.value)
    with pytest.raises(UserError) as missing:
        auth.user_token(str(tmp_path / "nope"))
    assert missing.value.key == "ray.auth_token_file" and "cannot read" in str(missing.value)
    clean_env.setenv(auth.TOKEN_PATH_ENV, str(tmp_path / "also-nope"))
    with pytest.raises(UserError) as env_missing:
        auth.user_token(None)
    assert env_missing.value.key == "ray.address" and auth.TOKEN_PATH_ENV in str(env_missing.value)


def test_refusal_message_names_the_source_not_the_token():
    err = auth.refused("10.0.0.2:6379", "ray.auth_token_file")
    assert str(err).startswith("ray.address: the Ray cluster at 10.0.0.2:6379 refused the token from "
                               "ray.auth_token_file")


def test_auth_errors_are_recognised_through_their_causes():
    from ray.exceptions import AuthenticationError

    try:
        try:
            raise AuthenticationError("bad token")
        except AuthenticationError as inner:
            raise RuntimeError("job server said no") from inner
    except RuntimeError as outer:
        assert auth.is_auth_error(outer)
    assert not auth.is_auth_error(ConnectionError("connection refused"))
    assert auth.probe("127.0.0.1:1", "x", timeout_s=1) == "unreachable"
