"""`merbridge-py run`: the node agent (the DaemonSet's process)."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path

import click

from . import logs, sigterm
from .status import DEFAULT_ADMIN_SOCKET

log = logging.getLogger("merbridge_py.agent")


CONFIG_MAP = "merbridge-py"   # holds `mode: ebpf|iptables` for every agent
FIRST_SYNC_TIMEOUT = 30.0     # longest wait for the pod source before attaching anyway
DRAIN_SECONDS = 1.0           # on SIGTERM: connect hook off first, the rest this much later


class InputError(click.ClickException):
    """A bad input file: one line on stderr, exit code 2 like a usage error."""

    exit_code = 2

EXAMPLES = """
\b
examples:
  # a simulated node: pods from a file, programs on a child cgroup
  merbridge-py run --cgroup /sys/fs/cgroup/unified/mbp-tb/node1 --pods-file pods.json
  # in a cluster (the DaemonSet): pods from the API server, NODE_NAME from the downward API
  merbridge-py run --cgroup /sys/fs/cgroup --bpffs /sys/fs/bpf/merbridge-py --metrics-addr 0.0.0.0:16019
  # the admin socket (pod list, mode switch), from the node or `kubectl exec`
  merbridge-py status --admin-socket /run/merbridge-py/agent.sock
  # print the exact eBPF program text that would be compiled, and exit
  merbridge-py run --ebpf
"""


@click.command(epilog=EXAMPLES)
@click.option("--cgroup", type=click.Path(path_type=Path), help="cgroup v2 directory whose processes are accelerated.")
@click.option("--pods-file", type=click.Path(path_type=Path), help="Pods from this file (Pod, PodList; YAML or JSON) instead of the API server.")
@click.option("--kubeconfig", type=click.Path(path_type=Path), envvar="MERBRIDGE_KUBECONFIG",
              help="Kubeconfig (default: in-cluster config; env MERBRIDGE_KUBECONFIG). With --pods-file, used "
                   "only to read the agent's DaemonSet on SIGTERM (--on-sigterm auto).")
@click.option("--node-name", envvar="NODE_NAME", help="This node's name (env NODE_NAME).")
@click.option("--bpffs", type=click.Path(path_type=Path), default=Path("/sys/fs/bpf/merbridge-py"), show_default=True,
              help="Directory on a bpffs for this agent's pins.")
@click.option("--metrics-addr", default="127.0.0.1:16019", show_default=True,
              help="HOST:PORT for the read-only endpoints /metrics, /healthz, /readyz.")
@click.option("--admin-socket", type=click.Path(path_type=Path), default=DEFAULT_ADMIN_SOCKET, show_default=True,
              envvar="MERBRIDGE_ADMIN_SOCKET",
              help="Unix socket for /status (pod details) and POST /mode; its directory is created 0700.")
@click.option("--on-sigterm", type=click.Choice([sigterm.AUTO, sigterm.KEEP, sigterm.DETACH]), default=sigterm.AUTO,
              show_default=True, envvar="MERBRIDGE_ON_SIGTERM",
              help="On SIGTERM, keep programs attached and maps pinned for a successor, or detach and unpin "
                   "everything; auto: keep unless the agent's own DaemonSet is gone or being deleted (detach "
                   "without a Kubernetes API).")
@click.option("--daemonset", envvar="DAEMONSET_NAME", default="merbridge-py", show_default=True,
              help="Name of the agent's DaemonSet in --namespace, read on SIGTERM (env DAEMONSET_NAME).")
@click.option("--mesh", default="istio", show_default=True, help="Mesh profile.")
@click.option("--namespace", envvar="POD_NAMESPACE", default="istio-system", show_default=True,
              help="The agent's namespace: its DaemonSet and the ConfigMap holding the mode (env POD_NAMESPACE).")
@click.option("--log-format", type=click.Choice(["plain", "json"]), default="plain", show_default=True)
@click.option("--splice", type=click.Choice(["adaptive", "always", "never"]), default="adaptive", show_default=True,
              help="Which same-node sockets are spliced: all but those whose pod's recent connections to the same "
                   "destination were short, a few messages sent (adaptive); all; or none (redirect and "
                   "SO_ORIGINAL_DST only).")
@click.option("--inbound-redirect", type=click.Choice(["iptables", "ebpf"]), default="iptables", show_default=True,
              help="Who moves a proxy's connection to a same-node pod onto that pod's inbound port: the pod's own "
                   "Istio rule (conntrack-identical to iptables mode), or the connect hook (for pods without "
                   "inbound rules).")
@click.option("--ebpf", "print_ebpf", is_flag=True, hidden=True, help="Print the eBPF program text and exit.")
@click.option("--max-connections", type=click.IntRange(16, 1 << 20), hidden=True,
              help="Entries of the per-connection maps (tests of a full map).")
@click.option("--installed-rules", type=click.Choice(["read", "ignore"]), default="read", hidden=True,
              help="read: decide each pod from the Istio rules installed in its namespace (the default); ignore: "
                   "from its spec alone (test nodes whose pods have no Istio rules at all).")
@click.option("--audit-interval", type=click.FloatRange(min=0), default=30.0, show_default=True,
              envvar="MERBRIDGE_AUDIT_INTERVAL",
              help="Seconds between audits of the kernel's pod entries against the agent's view (pods whose "
                   "sandbox was recreated with the same IP, entries missing, changed or of no pod: each repaired "
                   "and counted in merbridge_audit_differences_total); 0 turns the audit off.")
def run(cgroup, pods_file, kubeconfig, node_name, bpffs, metrics_addr, admin_socket, on_sigterm, daemonset, mesh,
        namespace, log_format, splice, inbound_redirect, print_ebpf, max_connections, installed_rules, audit_interval):
    """Load the eBPF datapath and keep it in step with this node's pods."""
    from ..datapath import (Datapath, DatapathError, check_settings, ensure_bpffs, leave_attached, open_cgroup,
                            program_text)
    from ..kheaders import HeadersNotFound
    from ..mesh import get_profile
    from .http import parse_addr

    try:
        profile = get_profile(mesh)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--mesh")
    if print_ebpf:
        click.echo("// cflags: " + " ".join(profile.cflags()))
        click.echo(program_text())
        return
    logs.setup(log_format)
    if cgroup is None:
        raise click.UsageError("--cgroup is required: the cgroup v2 directory whose pods are accelerated")
    try:
        parse_addr(metrics_addr)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--metrics-addr")
    try:  # every environment setting of the datapath, also those read only later or on some kernels
        check_settings()
    except DatapathError as e:
        raise click.ClickException(str(e))
    source_factory = _source_factory(pods_file, kubeconfig, node_name)
    try:  # fail on a wrong --cgroup before spending a second compiling
        os.close(open_cgroup(cgroup))
    except DatapathError as e:
        raise click.ClickException(str(e))

    from ..netns import NetnsIndex
    from .core import Agent
    from .http import AgentEndpoints
    from .metrics import AgentMetrics
    from .mode import ModeController, ModeStore

    # Once, before anything is loaded: what this kernel does decides how sockets are spliced.
    from ..kernel_probes import probe_kernel
    try:
        kernel = probe_kernel()
    except ValueError as e:
        raise click.ClickException(str(e))
    datapath = Datapath(profile, cgroup, bpffs, splice=splice,
                        rewrite_inbound_port=inbound_redirect == "ebpf", max_connections=max_connections,
                        kernel=kernel)
    metrics = AgentMetrics()
    metrics.kernel = kernel
    from ..policy.live_rules import read_netns
    agent = Agent(datapath, profile, netns_index=NetnsIndex(cgroup=cgroup), metrics=metrics,
                  rules_reader=read_netns if installed_rules == "read" else None, audit_interval=audit_interval or None)
    try:
        source, events, api = source_factory(agent.update_pods, metrics.registry)
        if api is None and kubeconfig is not None and on_sigterm == sigterm.AUTO:
            from .kube_source import default_api_client
            api = default_api_client(str(kubeconfig))
    except Exception as e:  # e.g. no kubeconfig and not in a cluster
        raise click.ClickException(f"cannot reach the Kubernetes API: {e}; pass --kubeconfig or --pods-file")
    ds_check = sigterm.DaemonSetCheck(api, namespace, daemonset) if api is not None else None
    if events is not None:
        agent.on_decision_change = events.on_decision_change
    # The node's mode comes first (issue 18): persisted beside the pins, it is
    # restored before anything is loaded or attached; in cluster mode the
    # ConfigMap is read before attaching (see mode.py for the precedence).
    cluster = hasattr(source, "watch_config_map")
    modes = ModeController(datapath, metrics, ModeStore(bpffs), cluster=cluster)
    if cluster:
        source.watch_config_map(namespace, CONFIG_MAP, modes.from_config_maps)
        modes.config_map_error = lambda: getattr(source, "config_map_error", None)
    metrics.source = source
    try:
        ensure_bpffs(bpffs)
        modes.restore()
    except DatapathError as e:
        raise click.ClickException(str(e))

    stop = threading.Event()
    signalled = threading.Event()

    def on_signal(*_):
        signalled.set()
        stop.set()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    try:
        datapath.load()
    except (DatapathError, HeadersNotFound) as e:
        datapath.close()
        raise click.ClickException(str(e))
    log.info("%s", kernel.summary())   # after the load: a failed start prints one line, its error
    metrics.datapath = datapath
    http = None
    threads = []
    keep = False
    try:
        try:
            http = AgentEndpoints(metrics_addr, admin_socket, agent, metrics, lambda: datapath.serving, modes)
        except OSError as e:
            raise click.ClickException(f"cannot serve on --metrics-addr {metrics_addr} or --admin-socket "
                                       f"{admin_socket}: {e.strerror or e}")
        http.start()
        threads = [threading.Thread(target=source.run, args=(stop,), name="source", daemon=True),
                   threading.Thread(target=agent.run, args=(stop,), name="reconcile", daemon=True)]
        # map occupancy is counted here, off the request path (a scrape only reads the latest count)
        threads.append(threading.Thread(target=metrics.run_map_census, args=(stop,), name="map-census", daemon=True))
        if events is not None:
            threads.append(threading.Thread(target=events.run, args=(stop,), name="events", daemon=True))
        if ds_check is not None:
            threads.append(threading.Thread(target=ds_check.watch_start, args=(stop,), name="daemonset",
                                            daemon=True))
        for t in threads:
            t.start()
        # Fill the maps before attaching: attach() replaces a crashed
        # predecessor's programs at once, and programs that know no pod yet
        # would send every new connection back to iptables until the first
        # reconcile. In cluster mode, also read the ConfigMap first, so the
        # agent attaches in the cluster's mode. A source that cannot deliver
        # only delays the attach; it then happens in the mode restore() chose
        # (the persisted one, or iptables), never ebpf because a read failed.
        deadline = time.monotonic() + FIRST_SYNC_TIMEOUT
        while not stop.is_set() and time.monotonic() < deadline:
            if agent.ready.wait(0.05) and (not cluster or modes.config_map_read.wait(0.05)):
                break
        if cluster and not modes.config_map_read.is_set() and not stop.is_set():
            log.warning("ConfigMap %s/%s not read within %.0f s: attaching in %s mode (%s); following the "
                        "ConfigMap once it can be read", namespace, CONFIG_MAP, FIRST_SYNC_TIMEOUT, modes.mode,
                        modes.status()["mode_origin"])
        # Stopped before attaching: leave a predecessor's programs and pins as
        # they are (close() below detaches nothing that is not ours).
        if not stop.is_set():
            try:
                with modes.locked():   # a switch arriving now waits: attach() reads the mode
                    datapath.attach()
            except (DatapathError, OSError) as e:
                raise click.ClickException(str(e))
            metrics.attached.set(1)
            log.info("datapath attached to %s in %s mode; serving on %s:%d, admin socket %s", cgroup, modes.mode,
                     *http.address, admin_socket)
        while not stop.wait(1.0):
            pass
        action, why = sigterm.decide(on_sigterm, ds_check)
        keep = action == sigterm.KEEP and signalled.is_set() and datapath.attached
        log.info("stopping: %s (%s)", "keeping programs attached and maps pinned for a successor" if keep
                 else "detaching programs and removing pins", why)
    finally:
        stop.set()
        for t in threads:
            t.join(5)
        if http:
            http.stop()
        if keep:
            leave_attached(datapath)
            log.info("stopped; programs attached and pinned under %s for the next agent "
                     "(none coming? run: merbridge-py cleanup)", bpffs)
        else:
            datapath.close(drain_seconds=DRAIN_SECONDS)
            log.info("stopped; nothing left attached or pinned")


def _source_factory(pods_file, kubeconfig, node_name):
    """Validate the source's arguments up front (so a bad file is a one-line
    error before anything is attached) and return a constructor:
    (on_change, metrics registry) -> (source, Event sender or None, API client or None)."""
    if pods_file is not None:
        from .pods_file import PodsFileError, PodsFileSource, load_pods
        try:
            load_pods(pods_file)
        except PodsFileError as e:
            raise InputError(str(e))
        return lambda on_change, registry: (PodsFileSource(pods_file, on_change), None, None)
    if not node_name:
        raise click.UsageError("without --pods-file the agent watches the API server and needs --node-name "
                               "(or env NODE_NAME, from the downward API in the DaemonSet)")
    from .events import EventSender
    from .kube_source import KubePodSource, default_api_client

    def kube_source(on_change, registry):
        # Pod decisions become Events only with the API server as the source (same credentials).
        api = default_api_client(str(kubeconfig) if kubeconfig else None)
        return KubePodSource(node_name, on_change, api_client=api), EventSender(api, node_name, registry), api
    return kube_source
