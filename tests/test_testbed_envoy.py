"""The Envoy sidecar's generated configuration, checked by Envoy itself
(`--mode validate`) and against the shape istiod gives a REDIRECT-mode
sidecar; the bed's CA and workload certificates; the witness counters read
from Envoy's stats; the bed's new parameters. No namespaces needed."""

from __future__ import annotations

import json
import os
import stat
import subprocess

import pytest
from cryptography import x509

from merbridge_py.testbed import Testbed, envoy, istio_iptables, pki, state, topology
from merbridge_py.testbed.envoy import EnvoySidecar
from merbridge_py.testbed.topology import PodSpec

SPECS = [PodSpec("a", ports=(8080, 9090)),
         PodSpec("b", ports=(8080, 9090), annotations={istio_iptables.ANN_EXCLUDE_INBOUND_PORTS: "9090"}),
         PodSpec("c", meshed=False)]


def sidecar(tmp_path, mtls="strict", http_ports=(), pod="a") -> EnvoySidecar:
    _, pods, _ = topology.plan("u", SPECS, 1)
    return EnvoySidecar(tmp_path, next(p for p in pods if p.name == pod), pods, http_ports=http_ports, mtls=mtls)


def listeners(sc: EnvoySidecar) -> dict[str, dict]:
    return {lst["name"]: lst for lst in sc.config()["static_resources"]["listeners"]}


def clusters(sc: EnvoySidecar) -> dict[str, dict]:
    return {c["name"]: c for c in sc.config()["static_resources"]["clusters"]}


def tls_context(obj: dict) -> dict | None:
    socket_ = obj.get("transport_socket")
    return socket_["typed_config"] if socket_ else None


@pytest.mark.parametrize("mtls", envoy.MTLS_MODES)
@pytest.mark.parametrize("http_ports", [(), (8080,)])
def test_envoy_accepts_the_config(tmp_path, mtls, http_ports):
    sc = sidecar(tmp_path, mtls, http_ports)
    sc.dir.mkdir()
    if mtls != "off":
        ca = pki.CertificateAuthority.create(tmp_path / "ca")
        ca.issue(sc.dir, pki.spiffe_id("default", "a"), (os.getuid(), os.getgid()))
    sc.config_path.write_text(json.dumps(sc.config()))
    check = subprocess.run(sc.argv() + ["--mode", "validate"], capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr


def test_the_binary_comes_from_the_wheel():
    out = subprocess.run([str(envoy.binary()), "--version"], capture_output=True, text=True, timeout=60).stdout
    assert "1.40.0" in out
    assert envoy.binary().parts[-3:] == ("envoy", "_bin", "envoy")


def test_listeners_are_laid_out_as_istiod_lays_them_out(tmp_path):
    found = listeners(sidecar(tmp_path, http_ports=(8080,)))
    out = found["virtualOutbound"]
    assert out["address"]["socket_address"] == {"address": "0.0.0.0", "port_value": 15001}
    assert out["use_original_dst"] is True
    assert out["default_filter_chain"]["filters"][0]["typed_config"]["cluster"] == "PassthroughCluster"
    # HTTP port: one 0.0.0.0_<port> listener; TCP port: one per destination IP (service and pod)
    assert found["0.0.0.0_8080"]["bind_to_port"] is False
    assert {f"{ip}_9090" for ip in ("10.96.0.10", "10.200.0.10", "10.96.0.11", "10.200.0.11")} <= set(found)
    assert not [name for name in found if name.endswith("_8080") and name != "0.0.0.0_8080"]
    assert all(found[name]["bind_to_port"] is False for name in found if name.endswith("_9090"))
    inbound = found["virtualInbound"]
    assert inbound["address"]["socket_address"]["port_value"] == 15006
    assert [f["name"] for f in inbound["listener_filters"]] == ["envoy.filters.listener.original_dst",
                                                                "envoy.filters.listener.tls_inspector"]
    assert found["health"]["address"]["socket_address"]["port_value"] == 15021


def test_http_port_routes_service_and_pod_addresses_to_the_service_cluster(tmp_path):
    hcm = listeners(sidecar(tmp_path, http_ports=(8080,)))["0.0.0.0_8080"]["filter_chains"][0]["filters"][0]
    hosts = {h["name"]: h for h in hcm["typed_config"]["route_config"]["virtual_hosts"]}
    b = hosts["b.default.svc.cluster.local:8080"]
    assert {"10.96.0.11", "10.96.0.11:8080", "10.200.0.11:8080"} <= set(b["domains"])
    assert b["routes"][0]["route"]["cluster"] == "outbound|8080||b.default.svc.cluster.local"
    assert "retry_policy" not in b["routes"][0]["route"]        # a datapath failure must not be retried away
    assert hosts["allow_any"]["routes"][0]["route"]["cluster"] == "PassthroughCluster"


def test_outbound_clusters_speak_istio_mtls_to_sidecars_only(tmp_path):
    found = clusters(sidecar(tmp_path))
    to_b = tls_context(found["outbound|8080||b.default.svc.cluster.local"])
    common = to_b["common_tls_context"]
    assert common["alpn_protocols"] == ["istio-peer-exchange", "istio"]
    assert common["validation_context"]["match_typed_subject_alt_names"] == [
        {"san_type": "URI", "matcher": {"exact": "spiffe://cluster.local/ns/default/sa/b"}}]
    assert to_b["sni"] == "outbound_.8080_._.b.default.svc.cluster.local"
    assert tls_context(found["outbound|8080||c.default.svc.cluster.local"]) is None   # no sidecar in c
    assert tls_context(found["outbound|9090||b.default.svc.cluster.local"]) is None   # b's sidecar never gets 9090
    assert tls_context(found["PassthroughCluster"]) is None
    assert not [c for c in clusters(sidecar(tmp_path, mtls="off")).values() if tls_context(c)]


def test_inbound_chains_per_mtls_mode(tmp_path):
    def chains(mtls):
        return [(c["filter_chain_match"].get("destination_port"), c["filter_chain_match"].get("transport_protocol"),
                 bool(tls_context(c))) for c in listeners(sidecar(tmp_path, mtls))["virtualInbound"]["filter_chains"]]
    assert chains("strict") == [(8080, "tls", True), (9090, "tls", True), (None, "tls", True)]
    assert chains("permissive") == [(8080, "tls", True), (8080, "raw_buffer", False), (9090, "tls", True),
                                    (9090, "raw_buffer", False), (None, "tls", True), (None, "raw_buffer", False)]
    assert chains("off") == [(8080, None, False), (9090, None, False), (None, None, False)]
    chain = listeners(sidecar(tmp_path, "strict"))["virtualInbound"]["filter_chains"][0]
    assert "istio-peer-exchange" in chain["filter_chain_match"]["application_protocols"]
    context = tls_context(chain)
    assert context["require_client_certificate"] is True
    assert context["common_tls_context"]["alpn_protocols"] == ["istio-peer-exchange", "h2", "http/1.1"]


def test_inbound_clusters_connect_from_127_0_0_6(tmp_path):
    found = clusters(sidecar(tmp_path))
    for name in ("InboundPassthroughCluster", "inbound|8080||", "inbound|9090||"):
        assert found[name]["type"] == "ORIGINAL_DST"
        assert found[name]["upstream_bind_config"]["source_address"]["address"] == "127.0.0.6"


def test_admin_is_a_unix_socket_and_workers_are_configurable(tmp_path):
    sc = sidecar(tmp_path)
    assert sc.config()["admin"]["address"] == {"pipe": {"path": str(sc.admin_path), "mode": 0o600}}
    assert sc.argv()[sc.argv().index("--concurrency") + 1] == "2"
    _, pods, _ = topology.plan("u", SPECS, 1)
    assert EnvoySidecar(tmp_path, pods[0], pods, workers=1).argv()[sc.argv().index("--concurrency") + 1] == "1"
    with pytest.raises(ValueError, match="mtls 'tls'"):
        EnvoySidecar(tmp_path, pods[0], pods, mtls="tls")


def test_witness_counters_from_stats(tmp_path):
    sc = sidecar(tmp_path)
    stats = {"listener.0.0.0.0_15001.downstream_cx_total": 0, "listener.10.96.0.11_9090.downstream_cx_total": 2,
             "listener.0.0.0.0_8080.downstream_cx_total": 3, "listener.0.0.0.0_8080.worker_1.downstream_cx_total": 3,
             "listener.0.0.0.0_15006.downstream_cx_total": 4, "listener.0.0.0.0_15021.downstream_cx_total": 1,
             "listener.admin.downstream_cx_total": 9, "listener.0.0.0.0_15006.ssl.handshake": 4,
             "cluster.outbound|8080||b.default.svc.cluster.local.ssl.handshake": 2,
             "cluster.outbound|9090||d.default.svc.cluster.local.ssl.handshake": 1}
    assert sc.connection_counts(stats) == {"outbound": 5, "inbound": 4, "health": 1}
    assert sc.tls_handshakes(stats) == {"outbound": 3, "inbound": 4}


def test_workload_certificates(tmp_path):
    ca = pki.CertificateAuthority.create(tmp_path / "ca")
    assert stat.S_IMODE((tmp_path / "ca" / pki.KEY).stat().st_mode) == 0o600
    (tmp_path / "a").mkdir()
    ca.issue(tmp_path / "a", pki.spiffe_id("default", "a"), (os.getuid(), os.getgid()))
    cert = x509.load_pem_x509_certificate((tmp_path / "a" / pki.CERT_CHAIN).read_bytes())
    cert.verify_directly_issued_by(pki.CertificateAuthority.load(tmp_path / "ca").cert)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://cluster.local/ns/default/sa/a"]
    for name in (pki.CERT_CHAIN, pki.KEY, pki.ROOT_CERT):
        assert stat.S_IMODE((tmp_path / "a" / name).stat().st_mode) == 0o400


@pytest.mark.parametrize("kwargs, message", [
    ({"proxy": "nginx"}, "proxy 'nginx'"),
    ({"mtls": "on"}, "mtls 'on'"),
    ({"proxy": "haproxy", "mtls": "strict"}, "needs proxy='envoy'"),
    ({"sidecar_log": True}, "sidecar_log needs proxy='haproxy'"),
    ({"envoy_workers": 0}, "envoy_workers 0"),
])
def test_bad_sidecar_parameters_fail_before_anything_exists(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Testbed.up("badparams", nodes=1, pods_per_node=1, **kwargs)
    assert not state.state_file("badparams").exists()


def test_attach_restores_the_sidecar_choice(tmp_path, monkeypatch):
    monkeypatch.setattr(state, "STATE_DIR", tmp_path)
    nodes, pods, fabric = topology.plan("att", SPECS, 1)
    Testbed("att", nodes, pods, fabric, slot=0, proxy="envoy", mtls="strict", envoy_workers=1)._save()
    back = Testbed.attach("att")
    assert (back.proxy, back.mtls, back.envoy_workers) == ("envoy", "strict", 1)
