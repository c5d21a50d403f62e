"""`merbridge-py testbed`: bring a simulated Istio node up and down."""

from __future__ import annotations

import json
import sys

import click

from .options import DEFAULT_ENVOY_WORKERS, DEFAULT_MTLS, MODES, MTLS_MODES, PROXIES

EXAMPLES = """
\b
examples:
  merbridge-py testbed up --nodes 2 --pods-per-node 2 --mode iptables --mtls strict
  merbridge-py testbed exec n0p0 -- curl -s 10.200.1.10:8080/whoami   # from pod n0p0 to n1p0
  merbridge-py testbed mode ebpf            # + one merbridge-py agent per node
  merbridge-py testbed up --name hp --proxy haproxy   # HAProxy sidecars instead of Envoy
  merbridge-py testbed up --name nf --rules nftables --mesh-default excludeIPRanges=10.0.0.0/8 --cni
  merbridge-py testbed status
  merbridge-py testbed down                 # or: down --all, for every leftover
"""


def _emit(data) -> None:
    click.echo(json.dumps(data, indent=2))


@click.group(epilog=EXAMPLES)
def testbed():
    """A simulated Istio node: pods in network namespaces and cgroups, Istio's
    nat rules, Envoy sidecars with mTLS, and (mode ebpf) the merbridge-py
    agent. See docs/testbed.md."""


@testbed.command(epilog=EXAMPLES)
@click.option("--name", default="tb", show_default=True, help="Test bed name (lowercase letters and digits).")
@click.option("--nodes", type=click.IntRange(1, 200), default=2, show_default=True)
@click.option("--pods-per-node", type=click.IntRange(1, 200), default=2, show_default=True)
@click.option("--plain-per-node", type=click.IntRange(0, 200), default=0, show_default=True,
              help="How many pods of each node have no sidecar.")
@click.option("--mode", type=click.Choice(MODES), default="iptables", show_default=True)
@click.option("--proxy", type=click.Choice(PROXIES), default="envoy", show_default=True,
              help="The sidecar: Envoy, configured as istiod configures it, or HAProxy (plain forwarding, no mTLS).")
@click.option("--mtls", type=click.Choice(MTLS_MODES), default=DEFAULT_MTLS, show_default=True,
              help="Envoy's peer authentication: strict (mTLS only), permissive (Istio's default: mTLS between "
                   "sidecars, plain text accepted too) or off.")
@click.option("--envoy-workers", type=click.IntRange(1, 64), default=DEFAULT_ENVOY_WORKERS, show_default=True,
              help="Envoy's --concurrency (Istio's sidecar default is 2).")
@click.option("--sidecar-log", is_flag=True,
              help="HAProxy sidecars log every forwarded connection (original destination).")
@click.option("--app", type=click.Choice(["python", "nginx"]), default="python", show_default=True,
              help="The pods' HTTP server: python (every test endpoint) or nginx (for benchmarks).")
@click.option("--http-port", "http_ports", type=click.IntRange(1, 65535), multiple=True,
              help="A port the sidecars proxy as HTTP with pooled upstream connections, as Envoy does for a "
                   "Service port declared HTTP (repeatable). Other ports are plain TCP.")
@click.option("--rules", type=click.Choice(["iptables", "nftables"]), default="iptables", show_default=True,
              help="Istio's interception rules in the pods: istio-iptables' iptables rules, or Istio's native "
                   "nftables backend (values.global.nativeNftables; tables inet istio-proxy-*).")
@click.option("--mesh-default", "mesh_defaults", multiple=True, metavar="NAME=VALUE",
              help="A mesh-wide injection value (helm values.global.proxy.*): includeIPRanges, excludeIPRanges, "
                   "includeInboundPorts, excludeInboundPorts, includeOutboundPorts, excludeOutboundPorts, "
                   "statusPort, proxyUID, proxyGID (repeatable). It ends up in istio-init's arguments, or with "
                   "--cni in the pods' annotations, as Istio's injector puts it; the sidecars run as proxyUID.")
@click.option("--cni", is_flag=True, help="Pods injected for istio-cni (istio-validation; the effective values "
                                          "in the annotations) instead of istio-init.")
def up(name, nodes, pods_per_node, plain_per_node, mode, proxy, mtls, envoy_workers, sidecar_log, app, http_ports,
       rules, mesh_defaults, cni):
    """Create a test bed and print its pods as JSON."""
    from .istio_iptables import MeshDefaults
    from .testbed import Testbed, TestbedError
    if plain_per_node > pods_per_node:
        raise click.BadParameter("cannot exceed --pods-per-node", param_hint="--plain-per-node")
    try:
        defaults = MeshDefaults.parse(list(mesh_defaults)).to_dict()
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--mesh-default")
    try:
        tb = Testbed.up(name, nodes=nodes, pods_per_node=pods_per_node, plain_per_node=plain_per_node,
                        mode=mode, sidecar_log=sidecar_log, app=app, http_ports=tuple(http_ports),
                        proxy=proxy, mtls=mtls, envoy_workers=envoy_workers, rules=rules,
                        mesh_defaults=defaults, cni=cni)
    except (TestbedError, ValueError) as e:
        raise click.ClickException(str(e))
    _emit(tb.summary())


@testbed.command()
@click.option("--name", default="tb", show_default=True)
@click.argument("mode", type=click.Choice(MODES))
def mode(name, mode):
    """Switch a running test bed to MODE (then clear conntrack and TIME_WAIT)."""
    from .testbed import Testbed, TestbedError
    try:
        tb = Testbed.attach(name)
        tb.set_mode(mode)
    except (TestbedError, ValueError) as e:
        raise click.ClickException(str(e))
    _emit(tb.summary())


@testbed.command()
@click.option("--name", help="One test bed (default: list them all).")
def status(name):
    """Show test beds: mode, pods, whether their processes run."""
    from . import state
    from .testbed import Testbed, TestbedError
    if name:
        try:
            _emit(Testbed.attach(name).status())
        except (TestbedError, ValueError) as e:
            raise click.ClickException(str(e))
        return
    _emit([{"name": n, "mode": (state.load(n) or {}).get("mode"), "status": (state.load(n) or {}).get("status")}
           for n in state.names()])


@testbed.command()
@click.option("--name", default="tb", show_default=True)
@click.option("--all", "everything", is_flag=True,
              help="Every test bed and every leftover of one (namespaces, cgroups, pins, processes).")
def down(name, everything):
    """Stop a test bed's processes and remove everything it created."""
    from .cleanup import all_names, teardown
    names = all_names() if everything else [name]
    failed = []
    for n in names:
        try:
            teardown(n)
        except Exception as e:  # keep going: remove as much as possible
            failed.append(f"{n}: {e}")
    _emit({"removed": [n for n in names if not any(f.startswith(f"{n}:") for f in failed)]})
    if failed:
        click.echo("\n".join(failed), err=True)
        sys.exit(1)


@testbed.command(name="exec", context_settings={"ignore_unknown_options": True})
@click.option("--name", default="tb", show_default=True)
@click.argument("pod")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_(name, pod, command):
    """Run COMMAND inside POD's network namespace and cgroup, as a container
    of the pod would run (`ip netns exec` alone would leave it outside the
    cgroup, where the eBPF programs never see it). Exits with its status."""
    from .testbed import Testbed, TestbedError
    try:
        tb = Testbed.attach(name)
        proc = tb.exec(pod, list(command))
    except (TestbedError, KeyError) as e:
        raise click.ClickException(str(e).strip('"'))
    try:
        status = proc.wait()
    except KeyboardInterrupt:   # the command got the same SIGINT (same process group): let it finish
        status = proc.wait()
    sys.exit(status)
