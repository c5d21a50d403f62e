"""The decision step of the node agent: which pods are accelerated, with which
capture policy, or why not (see docs/policy.md).

    verdict = decide(pod_dict)               # never raises
    outbound, inbound = compile_rules(verdict.policy, ISTIO)

Modules: model (PodPolicy, Verdict), annotations (annotation values ->
PodPolicy, as Istio accepts them), rules (PodPolicy -> first-match rule lists
for the datapath), reference (an independent model of Istio's capture
decision, for tests, testbed and benchmarks), installed (what Istio really
installed: live rules, istio-init's arguments, istio-cni's annotations),
pod (decide).
"""

from merbridge_py.policy.annotations import PolicyError, parse_policy
from merbridge_py.policy.installed import Capture, InstalledError, read_netns
from merbridge_py.policy.model import PodPolicy, Verdict
from merbridge_py.policy.pod import decide
from merbridge_py.policy.reference import captures_inbound, captures_outbound
from merbridge_py.policy.rules import (
    InboundRule, OutboundRule, compile_rules, first_match_inbound, first_match_outbound,
)

__all__ = [
    "decide", "Verdict", "PodPolicy", "OutboundRule", "InboundRule", "compile_rules",
    "captures_outbound", "captures_inbound", "first_match_outbound", "first_match_inbound",
    "parse_policy", "PolicyError", "Capture", "InstalledError", "read_netns",
]
