"""`merbridge-py toggle ebpf|iptables`: switch every node (through the
ConfigMap the agents watch) or, with --node, only this node's agent."""

from __future__ import annotations

import click

from .agent.cli import CONFIG_MAP as CONFIGMAP
from .agent.status import admin_socket_option, agent_request


@click.command(epilog="\b\nexamples:\n  merbridge-py toggle iptables           # every node back on Istio's iptables"
                      "\n  merbridge-py toggle ebpf --node        # only this node's agent")
@click.argument("mode", type=click.Choice(["ebpf", "iptables"]))
@click.option("--node", is_flag=True, help="Switch only the local agent, through its admin socket.")
@admin_socket_option
@click.option("--namespace", default="istio-system", show_default=True, help="The agents' namespace.")
@click.option("--kubeconfig", type=click.Path(), help="Kubeconfig (default: ~/.kube/config, then in-cluster).")
def toggle(mode, node, admin_socket, namespace, kubeconfig):
    """Switch between the eBPF datapath and Istio's own iptables."""
    if node:
        answer = agent_request(admin_socket, "/mode", {"mode": mode})
        click.echo(f"local agent is in {answer['mode']} mode (until the ConfigMap changes)")
        return
    from kubernetes import client, config
    try:
        config.load_kube_config(config_file=kubeconfig)
    except Exception:
        try:
            config.load_incluster_config()
        except Exception as e:
            raise click.ClickException(f"no Kubernetes credentials ({e}); pass --kubeconfig or use --node")
    try:
        client.CoreV1Api().patch_namespaced_config_map(CONFIGMAP, namespace, {"data": {"mode": mode}})
    except client.ApiException as e:
        raise click.ClickException(f"cannot update ConfigMap {namespace}/{CONFIGMAP}: {e.status} {e.reason}")
    click.echo(f"ConfigMap {namespace}/{CONFIGMAP} set to mode={mode}; every agent switches within seconds "
               "(check with: merbridge-py status)")
