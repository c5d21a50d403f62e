"""`merbridge-py toggle ebpf|iptables`: switch every node (through the
ConfigMap the agents watch) or, with --node, only this node's agent.

Precedence (agent/mode.py): a per-node switch holds until the next write to
the ConfigMap or `toggle --node --clear`. Every cluster-wide toggle writes
the ConfigMap (a fresh `merbridge-py/switched-at` annotation, even when the
mode is already the one asked for), so it overrides every node's switch."""

from __future__ import annotations

from datetime import datetime, timezone

import click

from .agent.cli import CONFIG_MAP as CONFIGMAP
from .agent.status import admin_socket_option, agent_request

SWITCHED_AT = "merbridge-py/switched-at"


@click.command(epilog="\b\nexamples:\n  merbridge-py toggle iptables           # every node back on Istio's iptables"
                      "\n  merbridge-py toggle ebpf --node        # only this node's agent, until the next toggle"
                      "\n  merbridge-py toggle --node --clear     # this node follows the ConfigMap again")
@click.argument("mode", type=click.Choice(["ebpf", "iptables"]), required=False)
@click.option("--node", is_flag=True, help="Switch only the local agent, through its admin socket. It holds (also "
                                           "across restarts) until the next cluster-wide toggle or --clear.")
@click.option("--clear", is_flag=True, help="With --node: drop this node's switch; it follows the ConfigMap again.")
@admin_socket_option
@click.option("--namespace", default="istio-system", show_default=True, help="The agents' namespace.")
@click.option("--kubeconfig", type=click.Path(), help="Kubeconfig (default: ~/.kube/config, then in-cluster).")
def toggle(mode, node, clear, admin_socket, namespace, kubeconfig):
    """Switch between the eBPF datapath and Istio's own iptables."""
    if clear and not node:
        raise click.UsageError("--clear applies to a node's own switch: use it with --node")
    if clear == (mode is not None):
        raise click.UsageError("give a MODE (ebpf or iptables), or --node --clear")
    if node:
        answer = agent_request(admin_socket, "/mode", {"clear": True} if clear else {"mode": mode})
        click.echo(f"local agent is in {answer['mode']} mode " +
                   ("(following the ConfigMap)" if clear else "(until the next cluster-wide toggle or --node --clear)"))
        return
    from kubernetes import client, config
    try:
        config.load_kube_config(config_file=kubeconfig)
    except Exception:
        try:
            config.load_incluster_config()
        except Exception as e:
            raise click.ClickException(f"no Kubernetes credentials ({e}); pass --kubeconfig or use --node")
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    try:
        client.CoreV1Api().patch_namespaced_config_map(
            CONFIGMAP, namespace, {"metadata": {"annotations": {SWITCHED_AT: now}}, "data": {"mode": mode}})
    except client.ApiException as e:
        raise click.ClickException(f"cannot update ConfigMap {namespace}/{CONFIGMAP}: {e.status} {e.reason}")
    click.echo(f"ConfigMap {namespace}/{CONFIGMAP} set to mode={mode}; every agent switches within seconds, "
               "including nodes switched with --node (check with: merbridge-py status)")
