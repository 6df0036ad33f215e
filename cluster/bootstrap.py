"""TPU VM startup script: install the run's wheel, clean the TPU host, and join the run's Ray cluster.

The script goes into node metadata as `startup-script`. It holds no credentials: the wheel and its
hash-locked requirements (launcher/wheel.py: `Staged`) are fetched with the VM service account's
short-lived token from the metadata server (gs:// URLs) or plainly (http(s):// URLs), and each is refused,
before anything is installed, unless its sha256 is the one baked into the script at staging. pip then
installs exactly the lock (`--require-hashes --no-deps`) and the wheel (`--no-deps`). The Ray head
address and port are read at every boot from the instance metadata attributes `ray-head-address` /
`ray-head-port` (so a moved head needs only a metadata update), with the values given here as fallbacks.
"""

from __future__ import annotations

import json
import re
import shlex

METADATA_URL = "http://metadata.google.internal/computeMetadata/v1/instance"
HEAD_ADDRESS_ATTR, HEAD_PORT_ATTR = "ray-head-address", "ray-head-port"
# Where a VM finds the run's Ray token: the Secret Manager secret's name (not the token) and its project, and an
# API endpoint override (tests). The scripts fetch it with the VM's own credentials (cluster/secrets.py).
TOKEN_SECRET_ATTR, PROJECT_ATTR, SECRET_ENDPOINT_ATTR = "ray-token-secret", "launcher-project", \
    "secret-manager-endpoint"


def token_metadata(project: str, run_name: str, endpoint: str | None = None) -> dict:
    """The metadata attributes that tell a VM which secret holds the run's Ray token."""
    from cluster.secrets import secret_id

    md = {TOKEN_SECRET_ATTR: secret_id(run_name), PROJECT_ATTR: project}
    if endpoint:
        md[SECRET_ENDPOINT_ATTR] = endpoint
    return md

# fetch_verified URL FILE SHA256: fetch URL into FILE (gs:// with the VM service account's short-lived token from the
# metadata server $MD, so no script holds credentials; http(s):// plainly), then refuse it unless its sha256 is the
# one staged with it: one line to the log ($LOG_TAG) and exit 1, before anything is installed. The one fetch of the
# TPU VM and head VM scripts.
FETCH_VERIFIED = r"""fetch_verified() {
  local url="$1" out="$2" want="$3" path bucket object token got
  case "$url" in
    gs://*)
      path="${url#gs://}"
      bucket="${path%%/*}"
      object="$(python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1], safe=""))' "${path#*/}")"
      token="$(curl -sf -H "Metadata-Flavor: Google" "$MD/service-accounts/default/token" \
        | python3 -c 'import json, sys; print(json.load(sys.stdin)["access_token"])')" \
        || { echo "[$LOG_TAG] no service account token from the metadata server to fetch $url"; exit 1; }
      # the header from a pipe, not argv: a command line is readable by every process on the VM
      curl -sf --retry 5 -H @<(printf 'Authorization: Bearer %s\n' "$token") -o "$out" \
        "https://storage.googleapis.com/storage/v1/b/$bucket/o/$object?alt=media" \
        || { echo "[$LOG_TAG] could not fetch $url"; exit 1; }
      unset token
      ;;
    *) curl -sf --retry 5 -o "$out" "$url" || { echo "[$LOG_TAG] could not fetch $url"; exit 1; } ;;
  esac
  got="$(sha256sum <"$out")"
  got="${got%% *}"
  if [ "$got" != "$want" ]; then
    echo "[$LOG_TAG] refusing $url: sha256 $got does not match the staged $want"
    rm -f "$out"
    exit 1
  fi
  echo "[$LOG_TAG] fetched $url (sha256 $got)"
}"""
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

# fetch_ray_token PYTHON OUT: the run's Ray token from Secret Manager (python -m cluster.secrets, with this VM's
# own credentials), 0600 at OUT, then Ray token auth on for every `ray` command after it. The secret's name comes
# from the metadata; the token never does. The one token fetch of the TPU VM and head VM scripts.
FETCH_TOKEN = r"""fetch_ray_token() {
  local py="$1" out="$2" secret project endpoint
  secret="$(curl -sf -H "Metadata-Flavor: Google" "$MD/attributes/%(secret)s")" \
    || { echo "[$LOG_TAG] refusing to start Ray: no %(secret)s in this VM's metadata"; exit 1; }
  project="$(curl -sf -H "Metadata-Flavor: Google" "$MD/attributes/%(project)s")" \
    || { echo "[$LOG_TAG] refusing to start Ray: no %(project)s in this VM's metadata"; exit 1; }
  endpoint="$(curl -sf -H "Metadata-Flavor: Google" "$MD/attributes/%(endpoint)s" || true)"
  "$py" -m cluster.secrets fetch --project "$project" --secret "$secret" --out "$out" --wait-s 300 \
    ${endpoint:+--endpoint "$endpoint"} \
    || { echo "[$LOG_TAG] refusing to start Ray: could not fetch the run's Ray token ($secret)"; exit 1; }
  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$out"
  unset RAY_AUTH_TOKEN
}
# This VM's internal address: Ray's ports listen there only. Without it Ray would listen on its default
# address, so a metadata server that does not say is refused before any `ray start`.
INTERNAL_IP="$(curl -sf -H "Metadata-Flavor: Google" "$MD/network-interfaces/0/ip" || true)"
if [ -z "$INTERNAL_IP" ]; then
  echo "[$LOG_TAG] refusing to start Ray: no internal IP from the metadata server ($MD/network-interfaces/0/ip)"
  exit 1
fi
""" % {
    "secret": TOKEN_SECRET_ATTR, "project": PROJECT_ATTR, "endpoint": SECRET_ENDPOINT_ATTR}


def staged_args(staged) -> dict:
    """The format arguments of the fetch part of a startup script: `fetch_verified` and the staged wheel's and
    lock's URLs and sha256 (`Staged` from launcher/wheel.py, or anything with those four attributes), quoted."""
    args = {"fetch_verified": FETCH_VERIFIED, "fetch_token": FETCH_TOKEN}
    for name in ("wheel_url", "wheel_sha256", "lock_url", "lock_sha256"):
        value = str(getattr(staged, name, "") or "")
        if name.endswith("_sha256") and not _SHA256.match(value):
            raise ValueError(f"{name} must be a sha256 (64 lowercase hex digits), got {value!r}")
        if not value:
            raise ValueError(f"{name} is empty")
        args[name] = shlex.quote(value)
    return args


_TEMPLATE = r"""#!/bin/bash
# tpu-pod-launcher bootstrap (generated): install the wheel, clean the TPU host, join the Ray cluster.
set -euo pipefail
exec >>"${{TPU_LAUNCHER_BOOTSTRAP_LOG:-/var/log/tpu-launcher-bootstrap.log}}" 2>&1
echo "[bootstrap] $(date -u +%FT%TZ) starting on $(hostname)"

MD={metadata_url}
md_attr() {{  # md_attr NAME DEFAULT: an instance metadata attribute, or DEFAULT when unset
  curl -sf -H "Metadata-Flavor: Google" "$MD/attributes/$1" || printf '%s' "$2"
}}
HEAD_ADDRESS="$(md_attr {head_attr} {head_address})"
RAY_PORT="$(md_attr {port_attr} {ray_port})"
WHEEL_URL={wheel_url}
WHEEL_SHA256={wheel_sha256}
LOCK_URL={lock_url}
LOCK_SHA256={lock_sha256}
WORKDIR="${{TPU_LAUNCHER_WORKDIR:-/opt/tpu-launcher}}"
mkdir -p "$WORKDIR"
WHEEL="$WORKDIR/$(basename "$WHEEL_URL")"
LOCK="$WORKDIR/$(basename "$LOCK_URL")"
LOG_TAG=bootstrap
{fetch_verified}

# 1. The project wheel and its hash-locked requirements (jax[tpu], ray, ...: every one `name==version --hash`)
#    from the run's bucket, each refused unless its sha256 is the staged one; then exactly the locked
#    distributions, each checked against its hash, and the wheel itself, with nothing resolved on the VM.
fetch_verified "$WHEEL_URL" "$WHEEL" "$WHEEL_SHA256"
fetch_verified "$LOCK_URL" "$LOCK" "$LOCK_SHA256"
python3 -m pip install --quiet --require-hashes --no-deps -r "$LOCK"
python3 -m pip install --quiet --no-deps --force-reinstall "$WHEEL"

# 2. Clean the TPU host: a stale libtpu lock or a leftover process holding the chips blocks the next run.
ray stop --force || true
rm -f /tmp/libtpu_lockfile
for dev in /dev/accel* /dev/vfio/*; do
  [ -e "$dev" ] || continue
  [ "$dev" = /dev/vfio/vfio ] && continue
  if command -v fuser >/dev/null; then
    fuser -k -9 "$dev" || true
  elif command -v lsof >/dev/null; then
    lsof -t "$dev" 2>/dev/null | xargs -r kill -9 || true
  fi
done

# 3. Join the run's Ray cluster with the run's token (ray detects the TPU resources and labels; these add the
#    run's own), its ports on this VM's internal address.
{fetch_token}
fetch_ray_token python3 "$WORKDIR/ray_token"
ray start --address="$HEAD_ADDRESS:$RAY_PORT" --node-ip-address="$INTERNAL_IP" \
  --resources={resources} --labels={labels}
echo "[bootstrap] $(date -u +%FT%TZ) joined $HEAD_ADDRESS:$RAY_PORT"
"""


def _ray_labels(labels_json: str) -> str:
    """Ray 2.60's `--labels` format (`k1=v1,k2=v2`) from a JSON object."""
    labels = json.loads(labels_json or "{}")
    if not isinstance(labels, dict):
        raise ValueError("labels_json must be a JSON object")
    for key, value in labels.items():
        if any(c in f"{key}{value}" for c in ",= \n"):
            raise ValueError(f"label {key}={value} may not contain ',', '=' or whitespace")
    return ",".join(f"{k}={v}" for k, v in labels.items())


def startup_script(staged, head_address: str, ray_port: int, resources_json: str, labels_json: str) -> str:
    """The bash startup script for the run's TPU VMs (metadata key `startup-script`).

    `staged` (launcher.wheel.Staged): the wheel and lock to fetch, and the sha256 each must have. jax[tpu] and
    libtpu come pinned in the lock (pyproject's `tpu` extra), not resolved on the VM.
    """
    resources = json.loads(resources_json or "{}")
    if not isinstance(resources, dict):
        raise ValueError("resources_json must be a JSON object")
    return _TEMPLATE.format(
        **staged_args(staged),
        metadata_url=shlex.quote(METADATA_URL), head_attr=shlex.quote(HEAD_ADDRESS_ATTR),
        port_attr=shlex.quote(HEAD_PORT_ATTR), head_address=shlex.quote(head_address),
        ray_port=shlex.quote(str(int(ray_port))),
        resources=shlex.quote(json.dumps(resources, separators=(",", ":"))),
        labels=shlex.quote(_ray_labels(labels_json)),
    )
