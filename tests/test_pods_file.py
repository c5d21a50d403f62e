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


# --- issue 13: every malformed file is one line, the source survives -------------------

from merbridge_py.agent.pods_file import load_pods  # noqa: E402

MALFORMED = [
    (b"apiVersion: v1\nkind: Pod\nmetadata:\n  name: a\n  creationTimestamp: 2025-13-01\n",
     "pods file {p} holds a value YAML cannot read: month must be in 1..12"),
    (b"[" * 100_000, "pods file {p} is nested too deeply"),
    (b"kind: Pod\nmetadata: {name: a}\n\xff\xfe", "pods file {p} is not UTF-8 text (byte 30)"),
    (b'{"kind": "PodList", "items": 5}', "pods file {p}: PodList.items is not a list"),
    (b" \n", "pods file {p} is empty (for no pods, write a PodList with no items)"),
    (b'{"kind": ["x"]}', "pods file {p}: expected kind Pod, PodList or List, found kind ['x']"),
    (b'{"kind": "Pod", "metadata": {"name": 5}}', "pods file {p}: a Pod has no metadata.name (a non-empty string)"),
]


@pytest.mark.parametrize("data, message", MALFORMED)
def test_malformed_files_are_one_line_errors(tmp_path, data, message):
    path = tmp_path / "pods.yaml"
    path.write_bytes(data)
    with pytest.raises(PodsFileError) as e:
        load_pods(path)
    assert str(e.value) == message.format(p=path)


@pytest.mark.parametrize("data, message", MALFORMED)
def test_run_prints_the_one_line_error(tmp_path, data, message):
    from click.testing import CliRunner

    from merbridge_py.cli import main
    path = tmp_path / "pods.yaml"
    path.write_bytes(data)
    result = CliRunner().invoke(main, ["run", "--cgroup", str(tmp_path), "--pods-file", str(path)])
    assert result.exit_code == 2
    assert result.output == f"Error: {message.format(p=path)}\n"


def test_source_survives_every_malformed_file_and_shows_the_error(tmp_path):
    from prometheus_client import generate_latest

    from merbridge_py.agent.metrics import AgentMetrics
    path = tmp_path / "pods.json"
    path.write_text(json.dumps({"kind": "PodList", "items": [POD]}))
    seen = []
    src = PodsFileSource(path, lambda pods: seen.append(sorted(pods)), interval=0.01)
    metrics = AgentMetrics()
    metrics.source = src
    stop = threading.Event()
    t = threading.Thread(target=src.run, args=(stop,))
    t.start()
    try:
        deadline = time.monotonic() + 5
        while not seen:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        for n, (data, message) in enumerate(MALFORMED, start=1):
            tmp = path.with_suffix(".tmp")   # replaced at once: the source never sees half a file
            tmp.write_bytes(data)
            tmp.replace(path)
            deadline = time.monotonic() + 5
            while src.errors < n:
                assert time.monotonic() < deadline and t.is_alive()
                time.sleep(0.01)
            assert src.last_error == message.format(p=path)
            text = generate_latest(metrics.registry).decode()
            assert f"merbridge_source_errors_total {float(n)}" in text
            assert "merbridge_source_failing 1.0" in text
        assert seen == [["ns/a"]], "the last good state is kept"
        path.write_text(json.dumps({"kind": "PodList", "items": []}))
        deadline = time.monotonic() + 5
        while seen[-1] != []:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert src.last_error is None and t.is_alive()
    finally:
        stop.set()
        t.join(5)
