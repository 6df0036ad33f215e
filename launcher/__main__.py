"""`python -m launcher [overrides...]`: compose the config, validate it, then run the job on the pod.

A run whose last launch completed at the same trainer.steps prints its result instead and starts nothing.
Hydra's flags (--help, --cfg job, --info, --shell-completion) and -m sweeps go through launcher/hydra_cli.py;
the usage examples of `--help` are in conf/config.yaml (hydra.help).
"""
import signal
import sys
import time
from typing import Optional


def _process_start_time() -> float:
    """When this command started (the process, not this function), for the run's timing points."""
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - psutil comes with ray[default]; fall back to now
        return time.time()


def _run_as_job(cfg, argv) -> int:
    """Hand the run to a Ray job on the head (or find the live one) and follow its output.

    Without ray.address a Ray head VM is created first (and deleted once the job is followed to its end); its job
    server is reached through an SSH tunnel. The run's Ray token goes to Secret Manager first (the head and the TPU
    VMs fetch it there), and its secret is deleted with the rest at the end.
    """
    from launcher import auth, job
    from launcher.config import to_yaml
    from launcher.supervisor import project_pythonpath
    from trainer import runfiles

    # This terminal's record of the run (the job writes its own on the head): `tpu-launch stop` and `tpu-launch
    # down` find the run's job and cloud resources from it.
    runfiles.write_atomic(runfiles.path(cfg.run.dir, runfiles.CONFIG), to_yaml(cfg))
    auth.publish(cfg)
    head = None
    try:
        if cfg.ray.address:
            ray_address = cfg.ray.address
            job_url = job.job_server_url(ray_address, int(cfg.ray.dashboard_port))
        else:
            head = job.HeadForRun(cfg)
            ray_address, job_url = head.up()
            argv = [*argv, f"ray.address={ray_address}"]
        client = job.connect(job_url)
        job_id = job.live_job(client, cfg.run.name)
        if job_id:
            print(f"[launcher] run {cfg.run.name} is live as job {job_id}: following it", flush=True)
        else:
            env = {"PYTHONPATH": project_pythonpath(), **job.stop_env(cfg)}
            if cfg.cluster.bucket:  # the job on the head provisions with what this terminal staged
                from launcher.wheel import staged_env, staged_for_run

                env.update(staged_env(staged_for_run(cfg.cluster.bucket)[0]))
            job_id = job.submit(client, cfg.run.name, argv, env, job.supervisor_python(cfg, own_head=head is not None))
            print(f"[launcher] submitted the supervisor as Ray job {job_id}; Ctrl-C detaches", flush=True)
        code, finished = job.follow(client, job_id)
    finally:
        if head is not None:
            head.close()
    if finished:  # the run directory the job left on the head, from its mirror in the bucket
        from launcher import mirror

        warning = mirror.refresh(cfg.run.dir, cfg)
        if warning:
            print(warning, file=sys.stderr, flush=True)
    if finished and cfg.cluster.delete_on_exit:
        if head is not None:
            head.down()
        auth.unpublish(cfg)
    return code


def use_run_token(cfg) -> None:
    """Ray token auth for this launch (launcher/auth.py), set up before Ray is imported: the run's own token for a
    cluster we create (kept in the run's record), the user's for one they named with `ray.address` (checked
    against that cluster first). A local pod, or a cluster on this machine's loopback, is reached on loopback."""
    import os
    from urllib.parse import urlsplit

    from cluster.local import LOOPBACK_ENV
    from launcher import auth

    local = cfg.cluster.provider == "local" and not cfg.ray.address
    if cfg.ray.address:
        host = urlsplit("//" + str(cfg.ray.address).split("://")[-1]).hostname or ""
        local = host in ("127.0.0.1", "localhost", "::1")
        if local:
            os.environ.update(LOOPBACK_ENV)
        auth.check_user_cluster(str(cfg.ray.address), cfg.ray.auth_token_file)
        return
    from launcher.rundir import RunDir

    if RunDir(cfg.run.dir).is_locked():
        return  # a live launch owns the run (and its token): this command only follows it, and writes nothing
    auth.use_token_file(auth.run_token_file(cfg.run.dir))
    if local:
        os.environ.update(LOOPBACK_ENV)


def _completed_summary(cfg) -> Optional[dict]:
    """The run's summary.json if its last launch completed at exactly trainer.steps and no launch is live: the
    same command again has nothing to train. More steps resume it; checkpoint.resume=false starts it afresh."""
    from launcher.rundir import RunDir
    from trainer import runfiles

    if not cfg.checkpoint.resume:
        return None
    from launcher import mirror

    warning = mirror.refresh(cfg.run.dir, cfg)  # a cloud run's directory is on the head: its mirror in the bucket
    if warning:
        print(warning, file=sys.stderr, flush=True)
    summary = runfiles.read_json(runfiles.path(cfg.run.dir, runfiles.SUMMARY))
    if not isinstance(summary, dict) or summary.get("status") != "completed" \
            or summary.get("final_step") != int(cfg.trainer.steps):
        return None
    return None if RunDir(cfg.run.dir).is_locked() else summary


def _say_completed(cfg, summary: dict) -> None:
    def num(x, fmt: str) -> str:
        return format(x, fmt) if isinstance(x, (int, float)) and not isinstance(x, bool) else "n/a"

    ev = summary.get("eval") or {}
    print(f"[launcher] run {cfg.run.name} already completed {summary['final_step']} steps; nothing started "
          f"(raise trainer.steps to train on): loss {num(summary.get('final_loss'), '.4f')}, "
          f"test loss {num(ev.get('eval_loss'), '.4f')}, ppl {num(ev.get('eval_ppl'), '.2f')}, "
          f"acc {num(ev.get('eval_acc'), '.4f')}, goodput {num(summary.get('goodput'), '.2f')}; "
          f"run dir {cfg.run.dir}", flush=True)


def main(argv=None) -> int:
    started_at = _process_start_time()
    # Ctrl-C must reach us even when started from a shell that ignores SIGINT for background jobs (`cmd &`,
    # CI runners): it is how a user stops a run with a checkpoint, or detaches from a live one.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    argv = list(sys.argv[1:] if argv is None else argv)
    from launcher import hydra_cli
    from launcher.errors import UserError
    from trainer.runfiles import EXIT_USER_ERROR

    try:
        if hydra_cli.is_flagged(argv):  # --help, --cfg, --info, -sc: Hydra's; -m: a sweep of launches
            return hydra_cli.main(argv)
        from launcher.config import compose_config
        from launcher.validate import validate

        cfg = compose_config(argv)
        plan = validate(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    done = None if cfg.launcher.dry_run else _completed_summary(cfg)
    if done is not None:  # nothing to train: no pod, no Ray, no file touched
        _say_completed(cfg, done)
        return 0
    try:
        if cfg.launcher.dry_run or (cfg.cluster.provider != "local" and cfg.launcher.preflight):
            from launcher import plan as planning

            p = planning.make_plan(cfg, plan, compile=True)
            print(planning.describe(p), flush=True)
            if cfg.launcher.dry_run:
                planning.write_plan(cfg.run.dir, p)
                print(f"[launcher] dry run: nothing created; plan in {cfg.run.dir}/plan.json", flush=True)
            # a dry run answers "would this launch?": a plan a launch refuses exits with the launch's error
            planning.refuse_if_unfit(p)
            if cfg.launcher.dry_run:
                return 0
        use_run_token(cfg)  # before Ray is imported: it reads the auth mode once
        from launcher.supervisor import launch

        if cfg.cluster.provider != "local" and cfg.launcher.submit and not cfg.launcher.in_job:
            return _run_as_job(cfg, argv)
        if cfg.cluster.provider != "local" and not cfg.launcher.in_job:  # supervised from this terminal
            from launcher import auth

            auth.publish(cfg)
            code = launch(cfg, plan, started_at)
            if cfg.cluster.delete_on_exit:
                auth.unpublish(cfg)
            return code
        return launch(cfg, plan, started_at)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
