"""The pods file source: the schema the API returns, clear errors, nothing lost."""

import json
import threading
import time

import pytest

from merbridge_py.agent.pods_file import PodsFileError, PodsFileSource, parse_pods

POD = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a", "namespace": "ns"}, "spec": {}, "status": {}}


def test_pod_podlist_list_and_multi_document():
    assert list(parse_pods(json.dumps(POD))) == ["ns/a"]
    assert list(parse_pods(json.dumps({"kind": "PodList", "items": [POD]}))) == ["ns/a"]
    assert list(parse_pods(json.dumps({"kind": "List", "items": [POD]}))) == ["ns/a"]
    b = dict(POD, metadata={"name": "b"})
    assert sorted(parse_pods(f"{json.dumps(POD)}\n---\n{json.dumps(b)}")) == ["default/b", "ns/a"]


@pytest.mark.parametrize("text, message", [
    ("items: [unclosed", "not valid YAML or JSON at line"),
    ("- just\n- a list", "found a list"),
    ('{"kind": "Service", "metadata": {"name": "x"}}', "found kind 'Service'"),
    ('{"kind": "PodList", "items": [{"kind": "Service"}]}', "not a Pod"),
    ('{"kind": "Pod", "metadata": {}}', "no metadata.name"),
])
def test_bad_files_name_the_problem(text, message):
    with pytest.raises(PodsFileError, match=message):
        parse_pods(text)


def test_source_follows_changes_and_keeps_last_good_state(tmp_path):
    path = tmp_path / "pods.json"
    path.write_text(json.dumps({"kind": "PodList", "items": [POD]}))
    seen = []
    src = PodsFileSource(path, lambda pods: seen.append(sorted(pods)), interval=0.02)
    stop = threading.Event()
    t = threading.Thread(target=src.run, args=(stop,))
    t.start()
    try:
        def wait_for(cond):
            deadline = time.monotonic() + 5
            while not cond():
                assert time.monotonic() < deadline
                time.sleep(0.02)
        wait_for(lambda: seen == [["ns/a"]])
        path.write_text("{broken")
        wait_for(lambda: src.last_error is not None)
        assert seen == [["ns/a"]], "a broken edit must not wipe the pods"
        b = dict(POD, metadata={"name": "b", "namespace": "ns"})
        path.write_text(json.dumps({"kind": "PodList", "items": [POD, b]}))
        wait_for(lambda: seen[-1] == ["ns/a", "ns/b"])
        assert src.last_error is None
    finally:
        stop.set()
        t.join(5)
