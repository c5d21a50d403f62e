"""What SIGTERM means to the agent (merbridge_py/agent/sigterm.py): its own
DaemonSet, read through the fake API server, tells a restart (keep) from an
uninstall (detach); every answer that cannot tell keeps."""

from __future__ import annotations

import threading

import pytest
from kubernetes import client

from fake_apiserver import FakeApiServer
from merbridge_py.agent import sigterm

NAMESPACE, NAME = "mbp-system", "merbridge-py"
DAEMONSETS = "daemonsets.apps"


def daemonset(**meta) -> dict:
    return {"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": NAME, "namespace": NAMESPACE, **meta}}


@pytest.fixture
def server():
    with FakeApiServer() as s:
        yield s


def check_for(server: FakeApiServer) -> sigterm.DaemonSetCheck:
    check = sigterm.DaemonSetCheck(client.ApiClient(client.Configuration(host=server.url)), NAMESPACE, NAME)
    check.watch_start(threading.Event())   # returns once readable
    return check


def test_present_daemonset_keeps(server):
    server.add(DAEMONSETS, daemonset())
    check = check_for(server)
    assert check.readable.is_set()
    assert check.decide()[0] == sigterm.KEEP
    # exactly one call, and one the RBAC grants: get of this one DaemonSet
    assert {(r.permission(), r.path) for r in server.requests} == {
        (("apps", "daemonsets", "get"), f"/apis/apps/v1/namespaces/{NAMESPACE}/daemonsets/{NAME}")}


def test_deleted_or_deleting_daemonset_detaches(server):
    server.add(DAEMONSETS, daemonset())
    check = check_for(server)
    server.update(DAEMONSETS, daemonset(deletionTimestamp="2026-01-01T00:00:00Z"))
    action, why = check.decide()
    assert action == sigterm.DETACH and "being deleted" in why
    server.delete(DAEMONSETS, NAMESPACE, NAME)
    action, why = check.decide()
    assert action == sigterm.DETACH and "gone" in why


def test_credentials_removed_with_the_daemonset_detach(server):
    server.add(DAEMONSETS, daemonset())
    check = check_for(server)
    server.forbidden.add(DAEMONSETS)
    action, why = check.decide()
    assert action == sigterm.DETACH and "403" in why


def test_unreachable_api_keeps(server):
    server.add(DAEMONSETS, daemonset())
    check = check_for(server)
    server.stop()
    action, why = check.decide()
    assert action == sigterm.KEEP and "unreachable" in why


def test_never_readable_keeps_whatever_the_answer(server):
    check = sigterm.DaemonSetCheck(client.ApiClient(client.Configuration(host=server.url)), NAMESPACE, NAME)
    stop = threading.Event()
    stop.set()
    check.watch_start(stop)
    assert not check.readable.is_set()
    assert check.decide()[0] == sigterm.KEEP        # 404: a wrong --daemonset, not an uninstall
    server.forbidden.add(DAEMONSETS)
    assert check.decide()[0] == sigterm.KEEP        # 403: RBAC never granted it


def test_explicit_choices_and_no_api():
    assert sigterm.decide(sigterm.KEEP, None)[0] == sigterm.KEEP
    assert sigterm.decide(sigterm.DETACH, None)[0] == sigterm.DETACH
    assert sigterm.decide(sigterm.AUTO, None)[0] == sigterm.DETACH
