"""Issue 18: the node's mode, its precedence and its persistence
(merbridge_py/agent/mode.py), without the kernel: a fake datapath and an
in-memory record store. The record on a real bpffs and the agent restarts
are in tests/test_mode_restart.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from merbridge_py.agent.mode import (CONFIG_MAP, DEFAULT, NODE_SWITCH, NOT_READ, UNREADABLE, ModeController,
                                     ModeRecord)
from merbridge_py.cli import main


class FakeDatapath:
    def __init__(self):
        self.mode, self.bpf, self.switches = "ebpf", None, []

    def set_mode(self, mode):
        self.switches.append(mode)
        self.mode = mode


class MemoryStore:
    path = Path("/memory/agent_mode")

    def __init__(self, record=None, broken=False):
        self.record, self.broken, self.saves = record, broken, 0

    def load(self):
        if self.broken:
            raise ValueError("garbage")
        return self.record

    def save(self, record):
        self.record = ModeRecord(**vars(record))
        self.saves += 1


def config_map(mode: str | None, version: str) -> dict:
    data = {"mode": mode} if mode else {}
    return {"mbp/merbridge-py": {"metadata": {"name": "merbridge-py", "resourceVersion": version}, "data": data}}


def controller(record=None, cluster=True, **kw):
    dp, store = FakeDatapath(), MemoryStore(record, **kw)
    modes = ModeController(dp, store=store, cluster=cluster)
    modes.restore()
    return modes, dp, store


def test_without_a_record_a_file_node_starts_in_the_default_and_persists_nothing():
    modes, dp, store = controller(cluster=False)
    assert dp.mode == "ebpf" and modes.status()["mode_origin"] == DEFAULT
    assert store.saves == 0


def test_without_a_record_a_cluster_node_holds_iptables_until_the_configmap_is_read():
    modes, dp, store = controller()
    assert dp.mode == "iptables"
    st = modes.status()
    assert st["mode_origin"] == NOT_READ and st["configmap"]["read"] is False
    modes.from_config_maps({})          # read: no ConfigMap -> the default
    assert dp.mode == "ebpf" and store.record.origin == DEFAULT and store.record.configmap_version is None
    assert modes.status()["configmap"]["read"] is True


def test_the_persisted_mode_is_restored_before_load_and_kept_while_the_configmap_is_unread():
    rec = ModeRecord("iptables", CONFIG_MAP, "2026-12-07T10:00:00Z", "7", "iptables")
    modes, dp, store = controller(rec)
    assert dp.mode == "iptables" and dp.switches == []     # the attribute, before load: nothing attached yet
    st = modes.status()
    assert (st["mode_origin"], st["mode_since"], st["configmap"]["read"]) == (CONFIG_MAP, rec.since, False)
    modes.from_config_maps(config_map("iptables", "7"))
    assert dp.mode == "iptables" and store.record.since == rec.since    # same decision: since unchanged
    modes.from_config_maps(config_map("ebpf", "8"))                        # changed while the agent was away
    assert dp.mode == "ebpf" and store.record.origin == CONFIG_MAP


def test_restore_refuses_a_loaded_datapath():
    dp = FakeDatapath()
    dp.bpf = object()
    with pytest.raises(RuntimeError):
        ModeController(dp, store=MemoryStore()).restore()


def test_an_unreadable_record_starts_in_iptables_and_says_why():
    modes, dp, _ = controller(cluster=False, broken=True)
    assert dp.mode == "iptables"
    st = modes.status()
    assert st["mode_origin"] == UNREADABLE and "garbage" in st["mode_record_error"]


def test_an_unreadable_record_shows_iptables_in_the_mode_metric():
    from merbridge_py.agent.metrics import AgentMetrics
    metrics = AgentMetrics()
    modes = ModeController(FakeDatapath(), metrics, store=MemoryStore(broken=True), cluster=False)
    modes.restore()
    assert metrics.registry.get_sample_value("merbridge_mode", {"mode": "iptables"}) == 1
    assert metrics.registry.get_sample_value("merbridge_mode", {"mode": "ebpf"}) == 0


def test_a_node_switch_holds_over_an_unchanged_configmap_until_the_next_write():
    modes, dp, store = controller()
    modes.from_config_maps(config_map("ebpf", "5"))
    assert dp.mode == "ebpf"
    assert modes.http_route(b'{"mode": "iptables"}')[0] == 200
    assert (dp.mode, store.record.origin, store.record.configmap_version) == ("iptables", NODE_SWITCH, "5")
    modes.from_config_maps(config_map("ebpf", "5"))        # a relist: the same version
    assert dp.mode == "iptables"
    modes.from_config_maps({})                             # deleted: changes nothing
    assert dp.mode == "iptables" and store.record.origin == NODE_SWITCH
    modes.from_config_maps(config_map("ebpf", "9"))        # a write: the ConfigMap wins
    assert (dp.mode, store.record.origin) == ("ebpf", CONFIG_MAP)


def test_after_a_restart_the_node_switch_still_holds_over_the_same_configmap():
    rec = ModeRecord("iptables", NODE_SWITCH, "2026-12-07T10:00:00Z", "5", "ebpf")
    modes, dp, store = controller(rec)
    assert dp.mode == "iptables"
    modes.from_config_maps(config_map("ebpf", "5"))
    assert dp.mode == "iptables" and dp.switches == [] and store.record.since == rec.since


def test_a_node_switch_made_before_any_read_takes_the_first_read_as_its_baseline():
    modes, dp, store = controller()
    modes.switch_node("iptables")
    assert store.record.configmap_version is None
    modes.from_config_maps(config_map("ebpf", "5"))
    assert dp.mode == "iptables" and store.record.configmap_version == "5"
    modes.from_config_maps(config_map("ebpf", "6"))
    assert dp.mode == "ebpf"


def test_clear_goes_back_to_the_configmap_or_the_default():
    modes, dp, store = controller()
    assert modes.http_route(b'{"clear": true}')[0] == 200        # nothing to clear: no change
    modes.switch_node("ebpf")
    code, answer = modes.http_route(b'{"clear": true}')
    assert code == 409 and "not been read" in answer["error"]
    modes.from_config_maps(config_map("iptables", "3"))
    assert dp.mode == "ebpf"                                      # the switch holds over the baseline read
    code, answer = modes.http_route(b'{"clear": true}')
    assert (code, answer) == (200, {"mode": "iptables"}) and modes.status()["mode_origin"] == CONFIG_MAP
    file_modes, file_dp, _ = controller(cluster=False)
    file_modes.switch_node("iptables")
    file_modes.clear_node()
    assert (file_dp.mode, file_modes.status()["mode_origin"]) == ("ebpf", DEFAULT)


@pytest.mark.parametrize("body", [b"not json", b'{"mode": "fast"}', b"{}", b'{"mode": "ebpf", "clear": true}',
                                  b'{"clear": "yes"}'])
def test_bad_mode_requests_get_a_400(body):
    modes, dp, _ = controller(cluster=False)
    code, answer = modes.http_route(body)
    assert code == 400 and answer["error"] and dp.switches == []


def test_a_bad_configmap_value_changes_nothing():
    modes, dp, _ = controller(ModeRecord("iptables", CONFIG_MAP, "t", "1", "iptables"))
    modes.from_config_maps(config_map("fast", "2"))
    assert dp.mode == "iptables"


def test_toggle_clear_needs_node_and_no_mode():
    for argv in (["toggle", "--clear"], ["toggle", "iptables", "--node", "--clear"], ["toggle"]):
        r = CliRunner().invoke(main, argv)
        assert r.exit_code == 2, (argv, r.output)


def test_status_text_shows_origin_and_configmap():
    from merbridge_py.agent import status as status_cmd
    modes, _, _ = controller(ModeRecord("iptables", NODE_SWITCH, "2026-12-07T10:00:00Z", "5", "ebpf"))
    body = {"attached": True, "ready": True, "pods": [], **modes.status()}
    original = status_cmd.agent_request
    status_cmd.agent_request = lambda *_a, **_k: json.loads(json.dumps(body))
    try:
        r = CliRunner().invoke(main, ["status"])
    finally:
        status_cmd.agent_request = original
    assert r.exit_code == 0, r.output
    assert "mode origin: node switch since 2026-12-07T10:00:00Z" in r.output
    assert "ConfigMap: NOT read yet" in r.output
