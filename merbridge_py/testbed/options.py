"""Choices of `testbed up` shared by the CLI and the bed (a module without
heavy imports, so `--help` stays fast)."""

MODES = ("nomesh", "iptables", "ebpf")
PROXIES = ("envoy", "haproxy")
MTLS_MODES = ("strict", "permissive", "off")
DEFAULT_MTLS = "permissive"     # Istio's default PeerAuthentication; auto-mTLS still makes sidecars speak mTLS
DEFAULT_ENVOY_WORKERS = 2       # Istio's sidecar default (proxy.istio.io/config concurrency: 2)
