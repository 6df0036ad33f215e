"""Stage what cloud hosts need in the run's bucket before provisioning: the token shards and a checkpoint dir.

TPU VMs cannot read this machine's disk, so a local data.path (e.g. the embedded corpus) is copied to
`<bucket>/data/<fingerprint>/` once (content-addressed: a second run reuses it) and a local checkpoint.dir
becomes `<bucket>/runs/<run.name>/checkpoints`.
"""
import json
import logging

from omegaconf import DictConfig, open_dict

from trainer.data.storage import open_store
from trainer.data.stream import read_manifest

log = logging.getLogger("launcher.stage")


def stage_data(local_path: str, bucket: str) -> str:
    # the validated reader: shard names are plain names inside local_path (DataError otherwise), so copying
    # them by name cannot read anything outside the data set
    manifest = read_manifest(local_path)
    src = open_store(local_path)
    target = f"{bucket.rstrip('/')}/data/{manifest['fingerprint'][:16]}"
    dst = open_store(target)
    if dst.exists("manifest.json") and json.loads(dst.read_bytes("manifest.json"))["fingerprint"] == \
            manifest["fingerprint"]:
        return target
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            dst.write_bytes(shard["name"], src.read_bytes(shard["name"]))
    # last: the data set is complete. The manifest that was checked, not a second read of the file.
    dst.write_bytes("manifest.json", (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    log.info("staged %s to %s", local_path, target)
    return target


def stage_for_cloud(cfg: DictConfig, say=print) -> None:
    """Point data.path and checkpoint.dir at the bucket (copying the data there if needed)."""
    bucket = cfg.cluster.bucket
    with open_dict(cfg):
        if not str(cfg.data.path).startswith("gs://"):
            cfg.data.path = stage_data(cfg.data.path, bucket)
            say(f"data staged at {cfg.data.path}")
        if not str(cfg.checkpoint.dir).startswith("gs://"):
            cfg.checkpoint.dir = f"{bucket.rstrip('/')}/runs/{cfg.run.name}/checkpoints"
            say(f"checkpoints go to {cfg.checkpoint.dir} (hosts share no disk with this machine)")
