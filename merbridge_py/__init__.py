"""merbridge-py: eBPF acceleration of Istio's sidecar data path."""

__version__ = "0.1.0"
