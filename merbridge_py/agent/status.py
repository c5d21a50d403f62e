"""`merbridge-py status`: ask the local agent, through its admin socket, which
pods it accelerates and why."""

from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path

import click

# Not imported from .http: the commands that talk to the agent stay quick to start.
DEFAULT_ADMIN_SOCKET = Path("/run/merbridge-py/agent.sock")


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.socket_path = str(path)

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.socket_path)


def agent_request(admin_socket: Path | str, path: str, body: dict | None = None, timeout: float = 30) -> dict:
    """GET `path` (POST `body` as JSON) on the agent's admin socket; its JSON answer."""
    conn = _UnixHTTPConnection(Path(admin_socket), timeout)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request("POST" if data is not None else "GET", path, body=data,
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        answer = resp.read()
    except PermissionError:
        raise click.ClickException(f"no permission to use the agent's admin socket {admin_socket}: run as root on "
                                   "the node, or `kubectl exec` into the agent's pod")
    except OSError as e:
        raise click.ClickException(f"no agent answering on {admin_socket} ({e.strerror or e}); is merbridge-py run "
                                   "running on this node, and is --admin-socket its --admin-socket?")
    finally:
        conn.close()
    if resp.status != 200:
        raise click.ClickException(f"agent at {admin_socket} answered {resp.status}: "
                                   f"{answer.decode(errors='replace').strip()}")
    return json.loads(answer)


admin_socket_option = click.option(
    "--admin-socket", type=click.Path(path_type=Path), default=DEFAULT_ADMIN_SOCKET, show_default=True,
    envvar="MERBRIDGE_ADMIN_SOCKET", help="The local agent's admin socket (its --admin-socket).")


@click.command(epilog="\b\nexamples:\n  merbridge-py status                 # table of this node's pods\n"
                      "  merbridge-py status --json | jq '.pods[] | select(.accelerated | not)'\n"
                      "  kubectl -n istio-system exec ds/merbridge-py -- merbridge-py status   # from outside")
@admin_socket_option
@click.option("--json", "as_json", is_flag=True, help="Print the agent's JSON as it is.")
def status(admin_socket, as_json):
    """List every pod on this node: accelerated or not, and why."""
    st = agent_request(admin_socket, "/status")
    if as_json:
        click.echo(json.dumps(st, indent=2))
        return
    click.echo(f"mode: {st.get('mode')}   attached: {st.get('attached')}   ready: {st.get('ready')}")
    if st.get("kernel"):
        click.echo(f"splice mode: {st['kernel']['splice_mode']} ({st['kernel']['why']})")
    if st.get("backlog_tracing"):   # issue 20, backpressure: whether readers' progress is counted
        # "unavailable: <why>; <the fallback the agent took>" says it all (datapath.backlog_tracing)
        click.echo(f"backpressure: reader tracing {st['backlog_tracing']}")
    if "mode_origin" in st:   # issue 18: where the mode came from, and whether the ConfigMap was read
        cm = st.get("configmap") or {}
        read = ("not watched (no Kubernetes source)" if not cm.get("watched") else
                f"read at {cm.get('read_at')}, mode {cm.get('mode') or 'unset'}" if cm.get("read") else
                f"NOT read yet ({cm.get('error') or 'waiting'}); keeping the node's last mode")
        click.echo(f"mode origin: {st['mode_origin']} since {st.get('mode_since')}   ConfigMap: {read}")
        if st.get("mode_record_error"):
            click.echo(f"mode record: {st['mode_record_error']}")
    if st.get("source_error"):
        click.echo(f"pod source error (last good state kept): {st['source_error']}")
    pods = st.get("pods", [])
    width = max([len(p["pod"]) for p in pods] + [3])
    # SOURCE: where the capture policy came from (the live rules in the pod, istio-init's arguments, ...)
    source_width = max([len(p.get("source") or "-") for p in pods] + [6])
    click.echo(f"{'POD'.ljust(width)}  {'IP'.ljust(15)}  ACCELERATED  {'SOURCE'.ljust(source_width)}  REASON")
    for p in pods:
        click.echo(f"{p['pod'].ljust(width)}  {(p.get('ip') or '-').ljust(15)}  "
                   f"{('yes' if p['accelerated'] else 'no').ljust(11)}  {(p.get('source') or '-').ljust(source_width)}"
                   f"  {p['reason']}")
