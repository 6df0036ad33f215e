"""GCE maintenance/preemption notices from the metadata server (cluster/maintenance.py)."""
import threading

from cluster.maintenance import MaintenanceWatch, read_notice
from metadata_server import MetadataServer


def test_quiet_metadata_means_no_notice():
    with MetadataServer() as md:
        assert read_notice(md.url) is None
        assert md.requests == 2


def test_maintenance_event_and_preemption_are_notices():
    with MetadataServer() as md:
        md.values["maintenance-event"] = "TERMINATE_ON_HOST_MAINTENANCE"
        assert read_notice(md.url) == "maintenance-event TERMINATE_ON_HOST_MAINTENANCE"
        md.values["maintenance-event"] = "NONE"
        md.values["preempted"] = "TRUE"
        assert read_notice(md.url) == "preempted TRUE"


def test_unreachable_metadata_server_is_not_a_notice():
    assert read_notice("http://127.0.0.1:9", timeout_s=0.5) is None


def test_watch_calls_back_once_on_a_notice():
    got, done = [], threading.Event()
    with MetadataServer() as md:
        watch = MaintenanceWatch(md.url, lambda n: (got.append(n), done.set()), poll_s=0.05).start()
        assert not done.wait(0.3)
        md.values["maintenance-event"] = "MIGRATE_ON_HOST_MAINTENANCE"
        assert done.wait(5)
        watch.stop()
    assert got == ["maintenance-event MIGRATE_ON_HOST_MAINTENANCE"]


def test_a_notice_pending_at_start_is_not_repeated_but_a_new_one_counts():
    got, done = [], threading.Event()
    with MetadataServer() as md:
        md.values["maintenance-event"] = "TERMINATE_ON_HOST_MAINTENANCE"  # honoured by the last trainer
        watch = MaintenanceWatch(md.url, lambda n: (got.append(n), done.set()), poll_s=0.05).start()
        assert not done.wait(0.5)
        md.values["maintenance-event"] = "NONE"
        assert not done.wait(0.3)
        md.values["preempted"] = "TRUE"
        assert done.wait(5)
        watch.stop()
    assert got == ["preempted TRUE"]
