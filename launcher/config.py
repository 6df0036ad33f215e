"""Compose the run config with Hydra (conf/ shipped as the `conf` package) and turn failures into UserErrors."""
import os
import re
from typing import List, Sequence

from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from launcher import schema
from launcher.errors import UserError, first_line


def _has_cluster_choice(overrides: Sequence[str]) -> bool:
    """Whether the overrides choose a cluster; a sweep value (a,b or range(...)) is refused: one launch runs one
    config, `-m` runs a sweep (launcher/sweep.py)."""
    chosen = False
    for ov in OverridesParser.create().parse_overrides(list(overrides)):
        if ov.is_sweep_override():
            raise UserError(ov.key_or_group, f"'{ov.input_line}' has several values",
                            "add -m to run one launch per value: python -m launcher -m ...")
        chosen = chosen or (ov.key_or_group == "cluster" and not ov.is_delete())
    return chosen


def with_default_cluster(overrides: Sequence[str]) -> List[str]:
    """The overrides with `+cluster=local` first unless they choose a cluster (conf/ has no default cluster, so
    that `+cluster=NAME` appends one); a malformed override is a UserError."""
    overrides = list(overrides)
    try:
        if not _has_cluster_choice(overrides):
            overrides.insert(0, "+cluster=local")
    except HydraException as e:
        raise UserError("overrides", first_line(e), "use key=value, +group=option") from None
    return overrides


def compose_config(overrides: Sequence[str]) -> DictConfig:
    """Compose conf/config.yaml with CLI overrides; without +cluster=NAME the local pod is used."""
    overrides = with_default_cluster(overrides)
    schema.register()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="conf", version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        raise _composition_error(e) from None
    finally:
        GlobalHydra.instance().clear()
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        raise UserError(_key_of(e), first_line(e), "fix the interpolation") from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise UserError(missing[0], "is required but not set", f"pass {missing[0]}=VALUE")
    return cfg


def _key_of(e: BaseException) -> str:
    key = getattr(e, "full_key", None)
    return str(key) if key else "config"


def _composition_error(e: BaseException) -> UserError:
    msg = first_line(e)
    cause = e.__cause__ or e.__context__
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        return UserError(str(cause.full_key), first_line(cause), "check the key name and type against conf/")
    if isinstance(e, OmegaConfBaseException) and getattr(e, "full_key", None):
        return UserError(str(e.full_key), msg, "check the key name and type against conf/")
    found = re.search(r"Could not (?:find|load) '([^/']+)/?([^']*)'", msg)
    if found:
        group, choice = found.group(1), found.group(2)
        choices = sorted(f[:-5] for f in os.listdir(os.path.join(_conf_dir(), group)) if f.endswith(".yaml")) \
            if os.path.isdir(os.path.join(_conf_dir(), group)) else []
        return UserError(group, f"unknown choice '{choice}'", f"choose one of: {', '.join(choices)}")
    return UserError("overrides", msg, "see conf/ for the valid keys and choices")


def _conf_dir() -> str:
    import conf

    return os.path.dirname(conf.__file__)


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
