"""`merbridge-py inspect-pod`: would this pod be accelerated, and why.

Prints the verdict of the same decide() the agent runs, as JSON. Reading
problems (not a Pod, a list of pods, bad YAML) are one line on stderr and exit
code 2; a pod that is not accelerated is a normal answer (exit 0).
"""

from __future__ import annotations

import json
import os
import sys

import click
import yaml

from merbridge_py.policy import decide, read_netns
from merbridge_py.policy import userns as userns_policy
from merbridge_py.userns import pids_in_netns, read_maps

EXAMPLES = """
\b
examples:
  merbridge-py inspect-pod pod.yaml                          # a Pod manifest, YAML or JSON
  kubectl get pod web-0 -o yaml | merbridge-py inspect-pod -  # a live pod, from stdin
  kubectl get pod web-0 -o json | merbridge-py inspect-pod - | jq -r .reason
  # on the pod's node, with the rules Istio installed in it (what the agent decides from):
  merbridge-py inspect-pod pod.yaml --netns /proc/$(pgrep -f pause | head -1)/ns/net
"""

POD_LISTS = ("PodList", "List")


class NotAPod(ValueError):
    """The input is not exactly one Pod; the message is the one-line explanation."""


def _yaml_problem(error: yaml.YAMLError) -> str:
    if isinstance(error, yaml.composer.ComposerError) and "single document" in str(error):
        return "more than one YAML document; inspect-pod reads one Pod"
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    mark = getattr(error, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"YAML syntax error{where}: {problem}"


def load_pod(data: bytes) -> dict:
    """One Pod from JSON or YAML text; raises NotAPod with a one-line reason."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise NotAPod(f"input is not UTF-8 text (byte {e.start})") from None
    try:
        # JSON first: PyYAML (YAML 1.1) rejects some valid JSON, e.g. tab indentation.
        document = json.loads(text)
    except RecursionError:
        raise NotAPod("document is nested too deeply") from None
    except ValueError:
        try:
            document = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise NotAPod(_yaml_problem(e)) from None
        except RecursionError:
            raise NotAPod("document is nested too deeply") from None
        except ValueError as e:   # a scalar YAML cannot construct, e.g. the timestamp 2025-13-01
            raise NotAPod(f"a value YAML cannot read: {str(e).splitlines()[0]}") from None
    if document is None:
        raise NotAPod("empty document; expected a Pod")
    if not isinstance(document, dict):
        raise NotAPod(f"expected a Pod (a mapping), got a {type(document).__name__}")
    kind = document.get("kind")
    if kind == "Pod":
        return document
    if kind in POD_LISTS:
        raise NotAPod(f"got a {kind}; inspect-pod reads one Pod (kubectl get pod NAME -o yaml)")
    if kind is None:
        raise NotAPod("document has no kind; expected kind: Pod")
    raise NotAPod(f"kind is {json.dumps(kind) if isinstance(kind, str) else repr(kind)}, not Pod")


def _read(source: str) -> bytes:
    if source == "-":
        return sys.stdin.buffer.read()
    with open(source, "rb") as f:
        return f.read()


@click.command("inspect-pod", epilog=EXAMPLES, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("source", metavar="FILE|-")
@click.option("--netns", "netns_path", metavar="PATH",
              help="The pod's network namespace (/proc/PID/ns/net of a process in the pod, or /run/netns/NAME): "
                   "its installed Istio rules are read and decided from, as the agent does (needs root on the "
                   "pod's node). Without it the verdict rests on the pod spec alone.")
@click.pass_context
def inspect_pod(ctx: click.Context, source: str, netns_path: str | None) -> None:
    """Print whether a pod would be accelerated, why, and its capture policy.

    Reads one Pod (YAML or JSON) from FILE, or from stdin with "-", and prints
    the agent's verdict as JSON; `policy.source` says where the capture policy
    came from ("iptables rules", "nftables rules", "istio-init arguments",
    "istio-cni annotations" or "annotations"). Exit code 0 whether or not the
    pod is accelerated; 2 if the input is not one readable Pod or the
    namespace cannot be opened.
    """
    try:
        pod = load_pod(_read(source))
    except OSError as e:
        click.echo(f"error: cannot read {source}: {e.strerror or e}", err=True)
        ctx.exit(2)
    except NotAPod as e:
        click.echo(f"error: {'stdin' if source == '-' else source}: {e}", err=True)
        ctx.exit(2)
    installed = None
    if netns_path is not None:
        if not os.path.exists(netns_path):
            click.echo(f"error: --netns {netns_path}: no such file", err=True)
            ctx.exit(2)
        installed = read_netns(netns_path)     # never raises: an unreadable rule set is the pod's reason
    verdict = decide(pod, installed=installed)
    if netns_path is not None and verdict.accelerate:
        # a pod in its own user namespace (hostUsers: false): the proxy ids as the kernel sees them
        try:
            maps = read_maps(netns_path, pids_in_netns(netns_path))
            verdict = userns_policy.in_user_namespace(verdict, maps)
        except (OSError, userns_policy.UsernsNotReady) as e:   # UsernsReadError is an OSError
            verdict = userns_policy.refused(verdict, f"its user namespace cannot be read: {e}", "userns_unreadable")
    click.echo(json.dumps(verdict.to_json(), indent=2))
