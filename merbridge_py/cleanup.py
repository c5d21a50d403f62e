"""`merbridge-py cleanup`: remove what an agent left on a node it no longer
runs on (an agent stopped for a restart leaves its programs attached for a
successor; so does one killed, or one stopped while the API server could
not say whether this was an uninstall)."""

from __future__ import annotations

import socket
from pathlib import Path

import click

from .agent.status import admin_socket_option

EXAMPLES = """
\b
examples:
  # on a node where the DaemonSet no longer runs (as root)
  merbridge-py cleanup
  # a test-bed node
  merbridge-py cleanup --bpffs /sys/fs/bpf/mbp-tb-node1 --cgroup /sys/fs/cgroup/unified/mbp-tb/node1
"""


def agent_answers(admin_socket: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX)
    try:
        probe.connect(str(admin_socket))
        return True
    except OSError:
        return False
    finally:
        probe.close()


@click.command(epilog=EXAMPLES)
@click.option("--bpffs", type=click.Path(path_type=Path), default=Path("/sys/fs/bpf/merbridge-py"), show_default=True,
              help="The agent's --bpffs directory.")
@click.option("--cgroup", type=click.Path(path_type=Path), default=Path("/sys/fs/cgroup"), show_default=True,
              help="The agent's --cgroup directory.")
@admin_socket_option
def cleanup(bpffs, cgroup, admin_socket):
    """Detach the programs a departed agent left and remove its pins.

    Only programs found through the pins under --bpffs are detached (others
    on the cgroup, e.g. Cilium's, are untouched). Safe to run twice: the
    second run finds nothing. Refuses while an agent answers on its admin
    socket (it would adopt the pins again)."""
    from .datapath import DatapathError, detach_pinned
    if agent_answers(admin_socket):
        raise click.ClickException(f"an agent is running on this node (it answers on {admin_socket}); "
                                   "stop it first, or it keeps its programs attached")
    try:
        done = detach_pinned(bpffs, cgroup)
    except (DatapathError, OSError) as e:
        raise click.ClickException(str(e))
    for line in done:
        click.echo(line)
    if not done:
        click.echo(f"nothing of merbridge-py under {bpffs}")
