"""`merbridge-py inspect-pod`, through click's CliRunner."""

import json

import pytest
import yaml
from click.testing import CliRunner

from merbridge_py.cli import main
from merbridge_py.inspect import inspect_pod
from merbridge_py.policy import decide

POD = {
    "apiVersion": "v1", "kind": "Pod",
    "metadata": {"name": "web-0", "namespace": "shop",
                 "annotations": {"traffic.sidecar.istio.io/excludeOutboundIPRanges": "169.254.169.254/32"}},
    "spec": {"initContainers": [{"name": "istio-init"}],
             "containers": [{"name": "app"}, {"name": "istio-proxy"}]},
    "status": {"phase": "Running", "podIP": "10.244.1.7", "podIPs": [{"ip": "10.244.1.7"}]},
}
KEYS = ["pod", "accelerate", "reason", "mesh", "ips", "policy", "families"]


def run(args, stdin=None):
    return CliRunner().invoke(main, ["inspect-pod", *args], input=stdin)


def test_yaml_file_prints_the_agents_verdict(tmp_path):
    path = tmp_path / "pod.yaml"
    path.write_text(yaml.safe_dump(POD))
    result = run([str(path)])
    assert result.exit_code == 0 and result.stderr == ""
    assert result.stdout == json.dumps(decide(POD).to_json(), indent=2) + "\n"
    doc = json.loads(result.stdout)
    assert list(doc) == KEYS and doc["accelerate"] is True
    assert doc["policy"]["exclude_outbound_ip_ranges"] == ["169.254.169.254/32"]


def test_json_from_stdin_including_tab_indentation_pyyaml_rejects():
    text = json.dumps(POD, indent="\t")
    with pytest.raises(yaml.YAMLError):
        yaml.safe_load(text)
    result = run(["-"], stdin=text)
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["pod"] == "shop/web-0"


def test_a_pod_that_is_not_accelerated_is_still_exit_0():
    pod = {**POD, "metadata": {**POD["metadata"], "annotations": {"merbridge.io/accelerate": "false"}}}
    result = run(["-"], stdin=json.dumps(pod))
    assert result.exit_code == 0
    doc = json.loads(result.stdout)
    assert doc["accelerate"] is False and doc["reason"].startswith("not accelerated: opted out")


def test_a_malformed_pod_object_is_a_verdict_not_a_reading_error():
    result = run(["-"], stdin="kind: Pod\nmetadata: {name: x}\n")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["reason"] == "not accelerated: malformed pod object: spec is missing"


@pytest.mark.parametrize("text, problem", [
    ("- kind: Pod\n", "expected a Pod (a mapping), got a list"),
    ("just words\n", "expected a Pod (a mapping), got a str"),
    ("", "empty document; expected a Pod"),
    ("kind: Service\nmetadata: {name: x}\n", 'kind is "Service", not Pod'),
    ("metadata: {name: x}\nspec: {}\n", "document has no kind; expected kind: Pod"),
    ('{"kind": "PodList", "items": []}', "got a PodList; inspect-pod reads one Pod"),
    ("kind: List\nitems: []\n", "got a List; inspect-pod reads one Pod"),
    ("kind: Pod\nmetadata: [\n", "YAML syntax error at line 3"),
    ("kind: Pod\n---\nkind: Pod\n", "more than one YAML document"),
    (b"kind: Pod\n\xff\n", "input is not UTF-8 text"),
])
def test_input_that_is_not_one_pod_is_a_one_line_error_and_exit_2(text, problem):
    result = run(["-"], stdin=text)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.startswith("error: stdin: ") and problem in result.stderr
    assert result.stderr.count("\n") == 1


def test_missing_file_is_exit_2(tmp_path):
    result = run([str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "cannot read" in result.stderr and "No such file" in result.stderr


def test_help_ends_with_examples():
    result = CliRunner().invoke(inspect_pod, ["--help"])
    assert result.exit_code == 0
    assert "examples:" in result.stdout
    assert "kubectl get pod web-0 -o yaml | merbridge-py inspect-pod -" in result.stdout


@pytest.mark.parametrize("data, message", [
    (b"apiVersion: v1\nkind: Pod\nmetadata:\n  name: a\n  creationTimestamp: 2025-13-01\n",
     "a value YAML cannot read: month must be in 1..12"),
    (b"[" * 100_000, "document is nested too deeply"),
    (b"a: " + b"[" * 100_000, "document is nested too deeply"),
    (b"kind: Pod\n\xff", "input is not UTF-8 text (byte 10)"),
])
def test_malformed_inputs_are_one_line_errors(tmp_path, data, message):
    path = tmp_path / "pod.yaml"
    path.write_bytes(data)
    result = run([str(path)])
    assert result.exit_code == 2
    assert result.stderr == f"error: {path}: {message}\n"


def test_a_huge_annotation_is_refused_by_its_size():
    pod = json.loads(json.dumps(POD))
    pod["metadata"]["annotations"]["traffic.sidecar.istio.io/excludeOutboundPorts"] = ",".join(["80"] * 100_000)
    doc = json.loads(run(["-"], stdin=json.dumps(pod)).stdout)
    assert doc["accelerate"] is False
    assert doc["reason"].endswith("(299999 characters, more than the 16384 this agent reads)")
