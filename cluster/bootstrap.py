"""TPU VM startup script: install the run's wheel, clean the TPU host, and join the run's Ray cluster.

The script goes into node metadata as `startup-script`. It holds no credentials: the wheel is fetched
with the VM service account's short-lived token from the metadata server (gs:// URLs) or plainly
(http(s):// URLs). The Ray head address and port are read at every boot from the instance metadata
attributes `ray-head-address` / `ray-head-port` (so a moved head needs only a metadata update), with
the values given here as fallbacks.
"""

from __future__ import annotations

import json
import shlex

METADATA_URL = "http://metadata.google.internal/computeMetadata/v1/instance"
HEAD_ADDRESS_ATTR, HEAD_PORT_ATTR = "ray-head-address", "ray-head-port"

# Fetch $WHEEL_URL into $WHEEL: gs:// with the VM service account's short-lived token from the metadata
# server ($MD), so no script holds credentials; http(s):// plainly. Shared by the TPU VM and head VM scripts.
FETCH_WHEEL = r"""case "$WHEEL_URL" in
  gs://*)
    path="${WHEEL_URL#gs://}"
    bucket="${path%%/*}"
    object="$(python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1], safe=""))' "${path#*/}")"
    token="$(curl -sf -H "Metadata-Flavor: Google" "$MD/service-accounts/default/token" \
      | python3 -c 'import json, sys; print(json.load(sys.stdin)["access_token"])')"
    curl -sf --retry 5 -H "Authorization: Bearer $token" -o "$WHEEL" \
      "https://storage.googleapis.com/storage/v1/b/$bucket/o/$object?alt=media"
    unset token
    ;;
  *) curl -sf --retry 5 -o "$WHEEL" "$WHEEL_URL" ;;
esac"""

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
WORKDIR="${{TPU_LAUNCHER_WORKDIR:-/opt/tpu-launcher}}"
mkdir -p "$WORKDIR"
WHEEL="$WORKDIR/$(basename "$WHEEL_URL")"

# 1. The project wheel from the run's bucket; its dependencies are pinned in the wheel's metadata.
{fetch_wheel}
python3 -m pip install --quiet --upgrade-strategy only-if-needed "$WHEEL"{extra_pip}

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

# 3. Join the run's Ray cluster (ray detects the TPU resources and labels; these add the run's own).
ray start --address="$HEAD_ADDRESS:$RAY_PORT" --resources={resources} --labels={labels}
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


def startup_script(wheel_url: str, head_address: str, ray_port: int, resources_json: str, labels_json: str,
                   extra_pip: tuple[str, ...] = ("jax[tpu]==0.10.2",)) -> str:
    """The bash startup script for the run's TPU VMs (metadata key `startup-script`)."""
    resources = json.loads(resources_json or "{}")
    if not isinstance(resources, dict):
        raise ValueError("resources_json must be a JSON object")
    return _TEMPLATE.format(
        fetch_wheel=FETCH_WHEEL,
        metadata_url=shlex.quote(METADATA_URL), head_attr=shlex.quote(HEAD_ADDRESS_ATTR),
        port_attr=shlex.quote(HEAD_PORT_ATTR), head_address=shlex.quote(head_address),
        ray_port=shlex.quote(str(int(ray_port))), wheel_url=shlex.quote(wheel_url),
        extra_pip="".join(f" {shlex.quote(p)}" for p in extra_pip),
        resources=shlex.quote(json.dumps(resources, separators=(",", ":"))),
        labels=shlex.quote(_ray_labels(labels_json)),
    )
