"""`merbridge-py status`: ask the local agent which pods it accelerates and why."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import click

DEFAULT_AGENT_ADDR = "127.0.0.1:16019"


def agent_request(addr: str, path: str, body: dict | None = None, timeout: float = 5) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://{addr}{path}", data=data, method="POST" if data else "GET",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace").strip()
        raise click.ClickException(f"agent at {addr} answered {e.code}: {detail}")
    except OSError as e:
        raise click.ClickException(f"no agent answering at {addr} ({getattr(e, 'reason', e)}); is merbridge-py run "
                                   "running on this node, and is --agent-addr its --metrics-addr?")


@click.command(epilog="\b\nexamples:\n  merbridge-py status                 # table of this node's pods\n"
                      "  merbridge-py status --json | jq '.pods[] | select(.accelerated | not)'")
@click.option("--agent-addr", default=DEFAULT_AGENT_ADDR, show_default=True, help="The agent's --metrics-addr.")
@click.option("--json", "as_json", is_flag=True, help="Print the agent's JSON as it is.")
def status(agent_addr, as_json):
    """List every pod on this node: accelerated or not, and why."""
    st = agent_request(agent_addr, "/status")
    if as_json:
        click.echo(json.dumps(st, indent=2))
        return
    click.echo(f"mode: {st.get('mode')}   attached: {st.get('attached')}   ready: {st.get('ready')}")
    if st.get("source_error"):
        click.echo(f"pod source error (last good state kept): {st['source_error']}")
    pods = st.get("pods", [])
    width = max([len(p["pod"]) for p in pods] + [3])
    click.echo(f"{'POD'.ljust(width)}  {'IP'.ljust(15)}  ACCELERATED  REASON")
    for p in pods:
        click.echo(f"{p['pod'].ljust(width)}  {(p.get('ip') or '-').ljust(15)}  "
                   f"{('yes' if p['accelerated'] else 'no').ljust(11)}  {p['reason']}")
