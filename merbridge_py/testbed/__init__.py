"""A simulated Istio node on this kernel: network namespaces for nodes and
pods, Istio's own nat rules, Envoy sidecars with mTLS (or HAProxy), a small app per pod, and
optionally one merbridge-py agent per node. See docs/testbed.md.

`Testbed` is imported lazily so that `python -m merbridge_py.testbed.app`
(started once per pod) pays only for the standard library.
"""

__all__ = ["Testbed", "PodSpec"]


def __getattr__(name):
    if name in __all__:
        from . import testbed
        return getattr(testbed, name)
    raise AttributeError(name)
