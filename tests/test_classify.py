"""Failure classification and restart budgets (launcher/classify.py): evidence in, cause and decision out."""
from launcher.classify import HOST_LOST, Budget, Evidence, classify


def test_provider_node_state_beats_exit_codes():
    f = classify(Evidence(codes={0: 1, 1: 137}, node_states={"tpu-a": "PREEMPTED"}))
    assert (f.cause, f.reprovision) == ("preemption", True) and "PREEMPTED" in f.detail


def test_healthy_node_states_are_no_evidence():
    f = classify(Evidence(codes={0: 1, 1: 137}, node_states={"tpu-a": "READY"}))
    assert (f.cause, f.host) == ("crash", 1)


def test_dead_or_drained_ray_node_is_a_preemption():
    assert classify(Evidence(dead_hosts=[1])).cause == "preemption"
    f = classify(Evidence(drained_hosts=[0], codes={0: 42, 1: 42}))
    assert f.cause == "preemption" and f.reprovision and "drained" in f.detail


def test_lost_actor_is_a_preemption_and_hang_is_a_hang():
    assert classify(Evidence(codes={0: HOST_LOST})).reprovision
    assert classify(Evidence(hung_hosts=[1])).cause == "hang"


def test_exit_42_reason_tells_preemption_from_init_timeout():
    assert classify(Evidence(codes={0: 42, 1: 42}, reasons={0: "preemption"})).cause == "preemption"
    assert classify(Evidence(codes={1: 42}, reasons={1: "init_failed"})).cause == "timeout"
    storage = classify(Evidence(codes={0: 42}, reasons={0: "storage"}))
    assert storage.cause == "storage" and storage.restartable


def test_the_signalled_host_is_blamed_not_its_peer_with_an_error():
    f = classify(Evidence(codes={0: 1, 1: 137}))
    assert (f.cause, f.host) == ("crash", 1) and "signal 9" in f.detail
    assert classify(Evidence(codes={1: 134}, phases={1: "init"})).cause == "timeout"


def test_other_exit_codes_are_user_errors():
    f = classify(Evidence(codes={0: 0, 1: 2}))
    assert (f.cause, f.host, f.restartable) == ("user_error", 1, False)


def test_budgets_and_backoff():
    b = Budget(max_preemptions=-1, max_failures=2, backoff_s=1, backoff_max_s=3)
    pre, crash, user = (classify(Evidence(dead_hosts=[0])), classify(Evidence(codes={0: 137})),
                        classify(Evidence(codes={0: 1})))
    assert all(b.allow(pre) is None for _ in range(50))  # preemptions: unlimited by default
    assert b.allow(crash) is None and b.allow(crash) is None
    assert "max_failures=2" in b.allow(crash)
    assert "user error" in b.allow(user)
    assert [b.backoff(False), b.backoff(False), b.backoff(False), b.backoff(True)] == [2, 3, 3, 1]
    limited = Budget(max_preemptions=1, max_failures=0, backoff_s=1, backoff_max_s=1)
    assert limited.allow(pre) is None and "max_preemptions=1" in limited.allow(pre)


def test_the_host_that_failed_first_is_blamed_by_its_heartbeat_time():
    # host 1 raised; host 0's collective then failed too: the earlier exit is the cause, whatever the host number
    f = classify(Evidence(codes={0: 1, 1: 1}, times={0: 130.0, 1: 100.0}))
    assert (f.cause, f.host) == ("user_error", 1)
    assert classify(Evidence(codes={0: 1, 1: 1})).host == 0  # no times: by host number, as before
    assert classify(Evidence(codes={0: 137, 1: 139}, times={0: 20.0, 1: 10.0})).host == 1
