"""Stage what cloud hosts need in the run's bucket before provisioning: the token shards and a checkpoint dir.

TPU VMs cannot read this machine's disk, so a local data.path (e.g. the embedded corpus) is copied to
`<bucket>/data/<fingerprint>/` once (content-addressed: a second run reuses it) and a local checkpoint.dir
becomes `<bucket>/runs/<run.name>/checkpoints`.
"""
import json
import logging

from omegaconf import DictConfig, open_dict

from trainer.data.storage import open_store

log = logging.getLogger("launcher.stage")


def stage_data(local_path: str, bucket: str) -> str:
    src = open_store(local_path)
    manifest = json.loads(src.read_bytes("manifest.json"))
    target = f"{bucket.rstrip('/')}/data/{manifest['fingerprint'][:16]}"
    dst = open_store(target)
    if dst.exists("manifest.json") and json.loads(dst.read_bytes("manifest.json"))["fingerprint"] == \
            manifest["fingerprint"]:
        return target
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            dst.write_bytes(shard["name"], src.read_bytes(shard["name"]))
    dst.write_bytes("manifest.json", src.read_bytes("manifest.json"))  # last: the data set is complete
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
