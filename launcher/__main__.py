"""`python -m launcher [overrides...]`: compose the config, validate it, then run the job on the pod.

Examples:
  python -m launcher                                   # default model on the embedded corpus, local pod
  python -m launcher run.name=demo trainer.steps=400   # a named run; the same command again resumes it
  python -m launcher +cluster=local cluster.hosts=4 cluster.devices_per_host=4
  python -m launcher --cfg model=tiny                  # print the composed config and exit
"""
import signal
import sys
import time


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
    if finished and cfg.cluster.delete_on_exit:
        if head is not None:
            head.down()
        auth.unpublish(cfg)
    return code


def _use_run_token(cfg) -> None:
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


def main(argv=None) -> int:
    started_at = _process_start_time()
    # Ctrl-C must reach us even when started from a shell that ignores SIGINT for background jobs (`cmd &`,
    # CI runners): it is how a user stops a run with a checkpoint, or detaches from a live one.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    show_cfg = "--cfg" in argv
    argv = [a for a in argv if a != "--cfg"]
    from launcher.config import compose_config, to_yaml
    from launcher.errors import UserError
    from trainer.runfiles import EXIT_USER_ERROR

    try:
        cfg = compose_config(argv)
        if show_cfg:
            print(to_yaml(cfg), end="")
            return 0
        from launcher.validate import validate

        plan = validate(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    try:
        if cfg.launcher.dry_run or (cfg.cluster.provider != "local" and cfg.launcher.preflight):
            from launcher import plan as planning

            p = planning.make_plan(cfg, plan, compile=True)
            print(planning.describe(p), flush=True)
            if cfg.launcher.dry_run:
                planning.write_plan(cfg.run.dir, p)
                print(f"[launcher] dry run: nothing created; plan in {cfg.run.dir}/plan.json")
                return 0
            planning.refuse_if_unfit(p)
        _use_run_token(cfg)  # before Ray is imported: it reads the auth mode once
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
