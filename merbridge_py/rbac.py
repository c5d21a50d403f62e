"""The Kubernetes API calls the node agent makes, as RBAC permissions.

One list with two users: `merbridge_py.manifests` generates the ClusterRole and
the Role from it, and tests compare it with the calls the agent really makes,
so the deployed permissions can neither lag behind the code nor exceed it.
A permission is a plain (api_group, resource, verb) tuple; "" is the core group.
"""

from __future__ import annotations

from typing import NamedTuple

# The ConfigMap holding `mode: ebpf|iptables`, in the agent's own namespace.
TOGGLE_CONFIGMAP = "merbridge-py"
# The agent's own DaemonSet, read on SIGTERM: present means a restart (keep the
# datapath for the successor), gone or deleting means an uninstall (detach).
AGENT_DAEMONSET = "merbridge-py"


class Permission(NamedTuple):
    api_group: str
    resource: str
    verb: str


# Granted cluster-wide (ClusterRole): the pods of this node live in every
# namespace. The agent lists and watches them with fieldSelector
# spec.nodeName=$NODE_NAME; RBAC cannot restrict by field, so the grant covers
# all pods and the selector only narrows what is sent. No get: the agent never
# reads a single pod (a list+watch mirror has every pod already).
# Events: the agent reports per-pod decisions as events.k8s.io/v1 Events, the
# API Kubernetes recommends for new producers (core/v1 Events are the same
# stored objects, shown by `kubectl describe pod` either way); granting one
# group keeps the grant minimal. An event about a pod is created in that pod's
# namespace, which is why this one is cluster-wide too.
CLUSTER_PERMISSIONS: frozenset[Permission] = frozenset({
    Permission("", "pods", "list"),
    Permission("", "pods", "watch"),
    Permission("events.k8s.io", "events", "create"),
})

# Granted in the agent's namespace only (Role), and only for the object named
# TOGGLE_CONFIGMAP (resourceNames). list and watch are authorized by name only
# when the request carries the field selector metadata.name=TOGGLE_CONFIGMAP
# (the API server then treats it as a request for that one object), so the
# agent must list/watch with that selector. No get, as for pods.
# (`merbridge-py toggle` writes the ConfigMap with the user's own credentials,
# not the agent's.) The agent's own DaemonSet: one get, by name, on SIGTERM
# (merbridge_py/agent/sigterm.py) and until it succeeds once at start.
NAMESPACE_PERMISSIONS: frozenset[Permission] = frozenset({
    Permission("", "configmaps", "list"),
    Permission("", "configmaps", "watch"),
    Permission("apps", "daemonsets", "get"),
})
NAMESPACE_RESOURCE_NAMES: dict[tuple[str, str], list[str]] = {
    ("", "configmaps"): [TOGGLE_CONFIGMAP],
    ("apps", "daemonsets"): [AGENT_DAEMONSET],
}

AGENT_PERMISSIONS: frozenset[Permission] = CLUSTER_PERMISSIONS | NAMESPACE_PERMISSIONS


def policy_rules(permissions: frozenset[Permission],
                 resource_names: dict[tuple[str, str], list[str]] | None = None) -> list[dict]:
    """Kubernetes PolicyRules for `permissions`: one rule per (group, resource),
    verbs sorted, rules sorted, so the generated YAML is stable."""
    verbs_by_resource: dict[tuple[str, str], set[str]] = {}
    for p in permissions:
        verbs_by_resource.setdefault((p.api_group, p.resource), set()).add(p.verb)
    rules = []
    for (group, resource), verbs in sorted(verbs_by_resource.items()):
        rule: dict = {"apiGroups": [group], "resources": [resource]}
        names = (resource_names or {}).get((group, resource))
        if names:
            rule["resourceNames"] = list(names)
        rule["verbs"] = sorted(verbs)
        rules.append(rule)
    return rules


def permissions_of(rules: list[dict]) -> set[Permission]:
    """The inverse of policy_rules: every (group, resource, verb) a list of
    PolicyRules grants. Used to check generated roles against the list above."""
    return {Permission(group, resource, verb)
            for rule in rules
            for group in rule["apiGroups"]
            for resource in rule["resources"]
            for verb in rule["verbs"]}
