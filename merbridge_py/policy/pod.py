"""decide(): is this pod accelerated, with which policy, or why not.

The agent calls it for every pod it sees and `merbridge-py inspect-pod` prints
its result, so what a user inspects is what the agent does. It reads the pod
the way Istio's sidecar injection leaves it (istio-proxy as a container or as a
native sidecar, istio-init or istio-cni's istio-validation, the traffic
annotations) and never raises: any input, however malformed, gets a verdict.

Not accelerating is always the safe answer: Istio's iptables rules stay in the
pod and keep serving it exactly as before.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass

from merbridge_py.layout import MAX_INBOUND_RULES, MAX_OUTBOUND_RULES
from merbridge_py.mesh import ISTIO, MeshProfile
from merbridge_py.policy.annotations import (
    EXCLUDE_INBOUND_PORTS, EXCLUDE_OUTBOUND_IP_RANGES, EXCLUDE_OUTBOUND_PORTS, INCLUDE_INBOUND_PORTS,
    INCLUDE_OUTBOUND_IP_RANGES, INCLUDE_OUTBOUND_PORTS, POLICY_ANNOTATIONS, STATUS_PORT, PolicyError, dedupe,
    parse_policy, parse_port_list, read_annotation, show,
)
from merbridge_py.policy.installed import (
    SOURCE_ANNOTATIONS, SOURCE_ARGS, Capture, InstalledError, Refused, choose, from_args, from_cni_annotations,
)
from merbridge_py.policy import dns as dns_policy
from merbridge_py.policy.model import PodPolicy, Verdict
from merbridge_py.policy.rules import compile_rules, family_verdicts

ACCELERATE = "merbridge.io/accelerate"                     # our opt-out: "true" | "false"
INTERCEPTION_MODE = "sidecar.istio.io/interceptionMode"    # REDIRECT | TPROXY | NONE
EXCLUDE_INTERFACES = "traffic.sidecar.istio.io/excludeInterfaces"
INTERCEPTION_MODES = ("REDIRECT", "TPROXY", "NONE")        # pkg/kube/inject/validate.go
ISTIO_INIT = "istio-init"                  # applies the iptables rules itself
ISTIO_VALIDATION = "istio-validation"      # istio-cni applied them; this only checks
# Proxy metadata the injector copies into the proxy's (and istio-init's) env.
ENV_INTERCEPTION_MODE = "ISTIO_META_INTERCEPTION_MODE"
ENV_DNS_CAPTURE = "ISTIO_META_DNS_CAPTURE"
ENV_OWNER_GROUPS = "ISTIO_OUTBOUND_OWNER_GROUPS"            # default "*"
ENV_OWNER_GROUPS_EXCLUDE = "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE"
GO_TRUE = ("1", "t", "T", "TRUE", "true", "True")           # strconv.ParseBool
FINISHED_PHASES = ("Succeeded", "Failed")


class MalformedPod(ValueError):
    """The object is not a usable Pod; the message names the field."""


class NotAccelerated(Exception):
    """Carries the reason, and a short stable code for metrics labels, out of
    the checks in decide()."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class PodFacts:
    """What decide() needs from a Pod object, read defensively."""

    id: str
    annotations: Mapping
    containers: tuple[Mapping, ...]
    init_containers: tuple[Mapping, ...]
    host_network: bool
    phase: str | None
    deleting: bool
    ipv4: tuple[str, ...]
    ipv6: tuple[str, ...]


def pod_id(pod: object) -> str:
    """ "namespace/name", with "?" for a missing name; never raises."""
    metadata = pod.get("metadata") if isinstance(pod, Mapping) else None
    metadata = metadata if isinstance(metadata, Mapping) else {}
    namespace, name = metadata.get("namespace"), metadata.get("name")
    namespace = namespace if isinstance(namespace, str) and namespace else "default"
    name = name if isinstance(name, str) and name else "?"
    return f"{namespace}/{name}"


def _mapping(value: object, path: str, default: Mapping | None = None) -> Mapping:
    if value is None and default is not None:
        return default
    if not isinstance(value, Mapping):
        raise MalformedPod(f"{path} is {'missing' if value is None else 'not a mapping'}")
    return value


def _mappings(value: object, path: str) -> tuple[Mapping, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise MalformedPod(f"{path} is not a list")
    for i, item in enumerate(value):
        if not isinstance(item, Mapping):
            raise MalformedPod(f"{path}[{i}] is not a mapping")
    return tuple(value)


def _pod_ips(status: Mapping) -> tuple[tuple[str, ...], tuple[str, ...]]:
    texts = []
    for i, entry in enumerate(_mappings(status.get("podIPs"), "status.podIPs")):
        if not isinstance(entry.get("ip"), str):
            raise MalformedPod(f"status.podIPs[{i}].ip is not a string")
        texts.append((f"status.podIPs[{i}].ip", entry["ip"]))
    single = status.get("podIP")
    if single is not None and not isinstance(single, str):
        raise MalformedPod("status.podIP is not a string")
    if single:
        texts.append(("status.podIP", single))
    ipv4, ipv6 = [], []
    for path, text in texts:
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            raise MalformedPod(f"{path} is not an IP address: {show(text)}") from None
        (ipv4 if ip.version == 4 else ipv6).append(str(ip))
    return tuple(dict.fromkeys(ipv4)), tuple(dict.fromkeys(ipv6))


def read_pod(pod: object) -> PodFacts:
    if not isinstance(pod, Mapping):
        raise MalformedPod(f"expected a mapping, got {type(pod).__name__}")
    metadata = _mapping(pod.get("metadata"), "metadata")
    name, namespace = metadata.get("name"), metadata.get("namespace")
    if not isinstance(name, str) or not name:
        raise MalformedPod("metadata.name is missing")
    if namespace is not None and not isinstance(namespace, str):
        raise MalformedPod("metadata.namespace is not a string")
    spec = _mapping(pod.get("spec"), "spec")
    status = _mapping(pod.get("status"), "status", default={})
    host_network = spec.get("hostNetwork")
    if host_network is not None and not isinstance(host_network, bool):
        raise MalformedPod("spec.hostNetwork is not a boolean")
    phase = status.get("phase")
    if phase is not None and not isinstance(phase, str):
        raise MalformedPod("status.phase is not a string")
    ipv4, ipv6 = _pod_ips(status)
    return PodFacts(
        id=pod_id(pod),
        annotations=_mapping(metadata.get("annotations"), "metadata.annotations", default={}),
        containers=_mappings(spec.get("containers"), "spec.containers"),
        init_containers=_mappings(spec.get("initContainers"), "spec.initContainers"),
        host_network=bool(host_network),
        phase=phase,
        deleting=metadata.get("deletionTimestamp") is not None,
        ipv4=ipv4,
        ipv6=ipv6,
    )


def sidecar_kind(facts: PodFacts, mesh: MeshProfile) -> str | None:
    """"classic", "native" (init container with restartPolicy Always) or None."""
    if any(c.get("name") == mesh.proxy_container for c in facts.containers):
        return "classic"
    if any(c.get("name") == mesh.proxy_container and c.get("restartPolicy") == "Always"
           for c in facts.init_containers):
        return "native"
    return None


def interception_setup(facts: PodFacts) -> str | None:
    names = {c.get("name") for c in facts.init_containers if isinstance(c.get("name"), str)}
    if ISTIO_INIT in names:
        return ISTIO_INIT
    if ISTIO_VALIDATION in names:
        return "istio-cni"
    return None


def proxy_env(facts: PodFacts, mesh: MeshProfile) -> dict[str, str]:
    """Literal env values of the proxy and of Istio's init container (which
    both receive the pod's proxy metadata); valueFrom entries are skipped."""
    wanted = {mesh.proxy_container, ISTIO_INIT, ISTIO_VALIDATION}
    env: dict[str, str] = {}
    for container in facts.containers + facts.init_containers:
        name = container.get("name")
        if not isinstance(name, str) or name not in wanted or not isinstance(container.get("env"), list):
            continue
        for var in container["env"]:
            if isinstance(var, Mapping) and isinstance(var.get("name"), str) and isinstance(var.get("value"), str):
                env.setdefault(var["name"], var["value"])
    return env


def _named(containers: tuple[Mapping, ...], name: str) -> Mapping | None:
    return next((c for c in containers if c.get("name") == name), None)


def _run_as(container: Mapping | None, key: str) -> int | None:
    context = container.get("securityContext") if container else None
    value = context.get(key) if isinstance(context, Mapping) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def spec_capture(facts: PodFacts, env: Mapping[str, str], mesh: MeshProfile) -> Capture:
    """The capture policy the pod spec records: istio-init's arguments (what
    istio-iptables ran with, mesh-wide defaults included), or with istio-cni
    the annotations the CNI plugin reads. A pod without either (hand-written
    pod objects) falls back to the annotations with the injector's defaults.
    Raises InstalledError or PolicyError."""
    dns = env.get(ENV_DNS_CAPTURE) in GO_TRUE
    proxy = _named(facts.containers + facts.init_containers, mesh.proxy_container)
    uid, gid = _run_as(proxy, "runAsUser"), _run_as(proxy, "runAsGroup")
    setup = interception_setup(facts)
    if setup == ISTIO_INIT:
        init = _named(facts.init_containers, ISTIO_INIT)
        command, args = init.get("command") or [], init.get("args") or []
        if not isinstance(command, list) or not isinstance(args, list):
            raise InstalledError(f"{ISTIO_INIT}'s command and args are not lists")
        argv = command + args
        if argv:
            return from_args(argv, dns)
    elif setup == "istio-cni":
        # istio-validation's own arguments only check the rules; the CNI
        # plugin installs them from the annotations.
        return from_cni_annotations(facts.annotations, uid, gid, dns)
    policy = parse_policy(facts.annotations, mesh, dns)
    policy = dataclasses.replace(policy, proxy_uid=uid or mesh.proxy_uid, proxy_gid=gid or uid or mesh.proxy_gid)
    return Capture(SOURCE_ANNOTATIONS, policy, (policy.proxy_uid,), (policy.proxy_gid,),
                   mesh.outbound_port, mesh.inbound_port)


def annotation_overlay(args: Capture, annotations: Mapping) -> Capture | None:
    """With istio-init, what the pod's annotations say now: istio-init's
    arguments with each flag an annotation names replaced by its value (an
    absent annotation means the injector used the mesh-wide value, which the
    arguments hold). Differs from the arguments when an annotation was
    patched after the pod started; None when no policy annotation is set.
    Raises PolicyError."""
    present = [name for name in POLICY_ANNOTATIONS if name in annotations]
    if not present:
        return None
    p = parse_policy(annotations, ISTIO, args.policy.dns_capture)     # annotation values, injector defaults
    fields = {INCLUDE_OUTBOUND_IP_RANGES: "include_outbound_ip_ranges",
              EXCLUDE_OUTBOUND_IP_RANGES: "exclude_outbound_ip_ranges",
              INCLUDE_INBOUND_PORTS: "include_inbound_ports", INCLUDE_OUTBOUND_PORTS: "include_outbound_ports",
              EXCLUDE_OUTBOUND_PORTS: "exclude_outbound_ports"}
    changes = {fields[name]: getattr(p, fields[name]) for name in present if name in fields}
    if STATUS_PORT in present:
        changes["exclude_inbound_ports"] = p.exclude_inbound_ports
    elif EXCLUDE_INBOUND_PORTS in present:
        # the status port the injector appended is not known: keep what the
        # arguments exempt and add what the annotation lists now
        listed = parse_port_list(EXCLUDE_INBOUND_PORTS, annotations[EXCLUDE_INBOUND_PORTS])
        changes["exclude_inbound_ports"] = dedupe(args.policy.exclude_inbound_ports + listed)
    policy = dataclasses.replace(args.policy, source=SOURCE_ANNOTATIONS, **changes)
    return dataclasses.replace(args, source=SOURCE_ANNOTATIONS, policy=policy, notes=())


def _chosen_capture(facts: PodFacts, env: Mapping[str, str], mesh: MeshProfile,
                    installed: Capture | InstalledError | None) -> tuple[Capture | None, NotAccelerated | None]:
    overlay = None
    try:
        spec: Capture | InstalledError = spec_capture(facts, env, mesh)
        if spec.source.startswith(SOURCE_ARGS):
            overlay = annotation_overlay(spec, facts.annotations)
    except PolicyError as e:
        return None, NotAccelerated(str(e), e.code)
    except InstalledError as e:
        if installed is None:
            return None, NotAccelerated(f"{ISTIO_INIT} arguments cannot be read exactly: {e}", "malformed_init_args")
        spec = e
    try:
        return choose([installed, spec, overlay]), None
    except Refused as e:
        code = "rules_unreadable" if isinstance(installed, InstalledError) else "installed_mismatch"
        return None, NotAccelerated(str(e), code)


def _check_capture(capture: Capture, mesh: MeshProfile) -> None:
    """What the datapath cannot mirror: other interception modes, other
    listener ports, several proxy ids."""
    if capture.mode != "REDIRECT":
        raise NotAccelerated(f"interception mode {capture.mode} ({capture.source}) is left to Istio's rules", "tproxy")
    if (capture.proxy_port, capture.inbound_port) != (mesh.outbound_port, mesh.inbound_port):
        raise NotAccelerated(f"{capture.source} redirect to ports {capture.proxy_port}/{capture.inbound_port}, "
                             f"the datapath to {mesh.outbound_port}/{mesh.inbound_port}", "policy_not_exact")
    if len(capture.proxy_uids) != 1 or len(capture.proxy_gids) != 1:
        raise NotAccelerated(f"{capture.source} exempt several proxy ids (uids {list(capture.proxy_uids)}, "
                             f"gids {list(capture.proxy_gids)}); the datapath exempts one uid", "policy_not_exact")
    # The one uid/gid reaches the pod's policy in the kernel (pod_policy.proxy_uid).


def _string_annotation(annotations: Mapping, name: str) -> str | None:
    try:
        return read_annotation(annotations, name)
    except PolicyError as e:
        raise NotAccelerated(str(e), e.code) from None


def _check_opt_out(annotations: Mapping) -> None:
    value = _string_annotation(annotations, ACCELERATE)
    if value is None or value == "true":
        return
    if value == "false":
        raise NotAccelerated(f'opted out ({ACCELERATE}: "false")', "opted_out")
    raise NotAccelerated(str(PolicyError(ACCELERATE, value, 'expected "true" or "false"')), "malformed_annotation")


def _check_interception(facts: PodFacts, env: Mapping[str, str]) -> None:
    mode = _string_annotation(facts.annotations, INTERCEPTION_MODE)
    if mode is not None and mode not in INTERCEPTION_MODES:
        raise NotAccelerated(str(PolicyError(INTERCEPTION_MODE, mode, "expected REDIRECT, TPROXY or NONE")),
                             "malformed_annotation")
    # The proxy's env records the mode at injection time, which is what the
    # iptables rules were built from; either source saying TPROXY/NONE wins.
    sources = [(mode, f"annotation {INTERCEPTION_MODE}"),
               (env.get(ENV_INTERCEPTION_MODE), f"proxy env {ENV_INTERCEPTION_MODE}")]
    for value, source in sources:
        if value == "TPROXY":
            raise NotAccelerated(f"interception mode TPROXY ({source}) is left to Istio's iptables", "tproxy")
    for value, source in sources:
        if value == "NONE":
            raise NotAccelerated(f"interception mode NONE ({source}): Istio does not intercept this pod",
                                 "interception_none")


def _check_honourable(facts: PodFacts, env: Mapping[str, str]) -> None:
    """Istio features that capture by something the datapath cannot see."""
    interfaces = _string_annotation(facts.annotations, EXCLUDE_INTERFACES)
    if interfaces:
        raise NotAccelerated(f"policy cannot be honoured exactly: {EXCLUDE_INTERFACES}: {show(interfaces)} "
                             "excludes traffic by egress interface", "policy_not_exact")
    groups, groups_excluded = env.get(ENV_OWNER_GROUPS, "*"), env.get(ENV_OWNER_GROUPS_EXCLUDE, "")
    if groups != "*" or groups_excluded:
        raise NotAccelerated("policy cannot be honoured exactly: outbound capture is filtered by process group "
                             f"({ENV_OWNER_GROUPS}={show(groups)}, {ENV_OWNER_GROUPS_EXCLUDE}={show(groups_excluded)})",
                             "policy_not_exact")


def _check_ips(facts: PodFacts) -> None:
    if facts.ipv4:
        return
    if facts.ipv6:
        raise NotAccelerated(f"IPv6-only pod ({', '.join(facts.ipv6)}); only pods with an IPv4 address are "
                             "accelerated (the agent finds a pod's namespace by it)", "ipv6_only")
    raise NotAccelerated("no pod IP yet", "no_ip")


def _check_rule_counts(policy: PodPolicy, mesh: MeshProfile) -> None:
    outbound, inbound = compile_rules(policy, mesh)
    problems = [f"{len(rules)} {direction} rules, the datapath holds {limit}"
                for rules, direction, limit in ((outbound, "outbound", MAX_OUTBOUND_RULES),
                                                (inbound, "inbound", MAX_INBOUND_RULES))
                if len(rules) > limit]
    if problems:
        raise NotAccelerated("policy needs " + " and ".join(problems), "policy_too_large")


def _notes(facts: PodFacts, policy: PodPolicy, mesh: MeshProfile) -> list[str]:
    notes = []
    if EXCLUDE_INBOUND_PORTS in facts.annotations and not policy.captures_all_inbound_ports:
        notes.append(f"{EXCLUDE_INBOUND_PORTS} has no effect unless includeInboundPorts is \"*\" (as in Istio)")
    if compile_rules(policy, mesh) == ([], []):
        notes.append("the policy captures no connections")
    return notes


def _decide(pod: object, mesh: MeshProfile, installed: Capture | InstalledError | None) -> Verdict:
    try:
        facts = read_pod(pod)
    except MalformedPod as e:
        return Verdict(pod_id(pod), False, f"not accelerated: malformed pod object: {e}", mesh.name, (), None,
                       code="malformed_pod")

    env = proxy_env(facts, mesh)
    capture, capture_error = _chosen_capture(facts, env, mesh, installed)
    policy = capture.policy if capture else None

    kind, setup = sidecar_kind(facts, mesh), interception_setup(facts)
    try:
        if kind is None:
            hint = ""
            if any(c.get("name") == mesh.proxy_container for c in facts.init_containers):
                hint = f" (init container {mesh.proxy_container} without restartPolicy: Always is not a sidecar)"
            raise NotAccelerated(f"no {mesh.proxy_container} sidecar{hint}", "no_sidecar")
        if facts.host_network:
            raise NotAccelerated("hostNetwork pod", "host_network")
        if facts.deleting:
            # Un-accelerating early is safe: iptables serves new connections
            # during the grace period, and the pod's IP may soon belong to another pod.
            raise NotAccelerated("pod is being deleted", "deleting")
        if facts.phase in FINISHED_PHASES:
            raise NotAccelerated(f"pod phase is {facts.phase} (its containers have exited; its IP may be reused)",
                                 "finished")
        _check_opt_out(facts.annotations)
        _check_interception(facts, env)
        if setup is None:
            raise NotAccelerated(f"no {ISTIO_INIT} or {ISTIO_VALIDATION} init container: "
                                 "Istio set up no interception for this pod", "no_interception_setup")
        _check_honourable(facts, env)
        if capture_error is not None:
            raise capture_error
        _check_capture(capture, mesh)
        _check_ips(facts)
        _check_rule_counts(policy, mesh)
    except NotAccelerated as e:
        reason = f"not accelerated: {e}"
        if capture_error is not None and str(capture_error) not in reason:
            reason += f"; also {capture_error}"
        verdict = Verdict(facts.id, False, reason, mesh.name, facts.ipv4, policy, code=e.code)
        return dataclasses.replace(verdict, families=family_verdicts(verdict, facts.ipv6))

    reason = f"accelerated: {mesh.name} sidecar ({kind}, {setup})"
    notes = ([] if capture.source == SOURCE_ANNOTATIONS else [f"policy from {capture.source}"]) + \
        list(capture.notes) + _notes(facts, policy, mesh)
    families = family_verdicts(Verdict(facts.id, True, reason, mesh.name, facts.ipv4, policy), facts.ipv6)
    if facts.ipv6:   # dual stack: say which families are accelerated
        ipv6 = families[1]
        notes.insert(0, "IPv4 and IPv6" if ipv6.accelerated else
                     f"IPv6 address {ipv6.address} stays on iptables: {ipv6.reason}")
    dns = dns_policy.intent(capture, cni=setup == "istio-cni")
    if dns.captured:
        notes.append(f"DNS: {dns.reason}")
    if notes:
        reason += "; " + "; ".join(notes)
    return Verdict(facts.id, True, reason, mesh.name, facts.ipv4, policy, families=families,
                   dns=dns if dns.captured else None)


def decide(pod: dict, mesh: MeshProfile = ISTIO, installed: Capture | InstalledError | None = None) -> Verdict:
    """The verdict for one Pod (a dict in Kubernetes API JSON form). Never raises.

    `installed` is what the pod's live nat rules say (installed.read_netns),
    or None when they were not read: the rules win over the pod spec, and a
    spec that would leave alone something the rules capture keeps the pod on
    iptables (policy/installed.py choose)."""
    try:
        return _decide(pod, mesh, installed)
    except Exception as e:  # noqa: BLE001 - the agent's loop must survive any pod
        # Reaching this is a bug in this module (tests assert it never happens);
        # the pod stays on iptables, which is safe.
        return Verdict(pod_id(pod), False, f"not accelerated: internal error: {type(e).__name__}: {e}",
                       mesh.name, (), None, code="internal_error")
