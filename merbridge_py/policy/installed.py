"""What Istio really installed for a pod, read back as a capture policy.

Three sources, most trusted first (issue 11):
  1. the live nat rules in the pod's network namespace (live_rules.py:
     iptables-save text or Istio's native nftables tables; with iptables,
     the ip6tables rules too, the ground truth for the pod's IPv6 side);
  2. istio-init's argument list (spec_sources.py; immutable once the pod exists);
  3. the annotations -- with istio-cni, the injector writes the effective
     values there and the CNI plugin reads them (spec_sources.py).

Every reader is exact: anything it does not recognise is an InstalledError
with the reason, and the pod stays on iptables. `choose()` (capture.py) picks
the most trusted available source and refuses when another available source
would leave alone something the chosen one captures.

How the agent uses it (agent/core.py): `InstalledRulesCache(read_netns).get(...)`
once per pod namespace and spec, then `decide(pod, installed=...)`.
"""

from merbridge_py.policy.capture import (  # noqa: F401
    SOURCE_ANNOTATIONS, SOURCE_ARGS, SOURCE_CNI, SOURCE_IPTABLES, SOURCE_NFTABLES, Capture, InstalledError, Refused,
    choose, extra_capture, make_capture,
)
from merbridge_py.policy.live_rules import (  # noqa: F401
    SOURCE_IP6TABLES, InstalledRulesCache, NoIstioRules, Rule, from_ip6tables_save, from_iptables_save, from_nft_json,
    from_rules, iptables_nat_rules, nftables_nat_rules, parse_iptables_rule, read_netns, spec_key, with_ipv6,
)
from merbridge_py.policy.spec_sources import from_args, from_cni_annotations, read_args  # noqa: F401
