"""`merbridge-py bench`: iptables vs eBPF vs no mesh on this kernel."""

from __future__ import annotations

import json
import os
import shlex
import time
from datetime import datetime, timezone
from pathlib import Path

import click

from ..testbed.options import DEFAULT_ENVOY_WORKERS, MTLS_MODES, PROXIES
from . import bed as bedmod
from . import busy, loads, machine, report, results, runner, schema
from .progress import Progress, format_duration

EXAMPLES = """
\b
examples:
  merbridge-py bench --quick                       # the targets' cases, ~3 minutes
  merbridge-py bench                               # every load and path, 10 rounds
  merbridge-py bench --busy none,half,all --loads 'keepalive:1,16' --paths same-node   # on a busy node
  merbridge-py bench --rounds 7 --duration 10 --out bench-results/full
  merbridge-py bench --modes iptables,ebpf --loads 'keepalive:1,16 newconn' --paths same-node
  merbridge-py bench --family inet6 --loads 'keepalive:1,16' --paths same-node   # AF_INET6, dual-stack bed
"""




def sidecar_how(sidecar: str, proxy: str) -> str:
    """How the sidecars treat the HTTP loads' port, in the report's words."""
    if sidecar == "http":
        how = (f"proxies port {loads.HTTP_PORT} as HTTP and reuses pooled upstream connections: a client's "
               "new connection ends at its own sidecar; sidecar-to-sidecar and sidecar-to-app connections are kept")
        return (f"Envoy (an HTTP connection manager per declared port, as istiod configures it) {how}"
                if proxy == "envoy" else f"HAProxy {how}, as Envoy does for a port Istio knows is HTTP")
    how = (f"proxies port {loads.HTTP_PORT} as plain TCP: every client connection makes a new "
           "sidecar-to-sidecar and sidecar-to-app connection")
    return (f"Envoy (tcp_proxy, as for a port Istio treats as opaque) {how}" if proxy == "envoy"
            else f"HAProxy {how}, as Envoy does for an opaque port")


def mtls_how(proxy: str, mtls: str) -> str:
    if proxy != "envoy" or mtls == "off":
        return "off: sidecars speak plain text to each other"
    if mtls == "strict":
        return ("strict: sidecar-to-sidecar connections are TLS with client certificates (SPIFFE URI SANs from the "
                "bed's CA, Istio's ALPN); the inbound chains accept nothing else")
    return ("permissive (Istio's default PeerAuthentication): the inbound chains accept TLS and plain text; the "
            "client sidecars originate mutual TLS to meshed pods (Istio's auto mTLS), so sidecar-to-sidecar "
            "traffic is mutual TLS as under strict")


def _split(value: str | None) -> list[str] | None:
    return [v for v in value.replace(",", " ").split()] if value else None


@click.command(epilog=EXAMPLES)
@click.option("--quick", is_flag=True, help="3 rounds × 2 s of only the cases the targets name.")
@click.option("--rounds", type=click.IntRange(min=1),
              help="Rounds of interleaved modes [10; quick: 3]. The sign test needs >= 5 to resolve anything.")
@click.option("--duration", type=click.IntRange(min=1), help="Seconds per measurement [5; quick: 2].")
@click.option("--warmup", type=click.IntRange(min=0), help="Seconds of warm-up per mode block and path.")
@click.option("--modes", help="Comma-separated, run in this order each round [nomesh,iptables,ebpf].")
@click.option("--loads", "load_specs", multiple=True,
              help="Loads and connection counts, e.g. 'keepalive:1,4,16,64 newconn:4 tcp_rr bulk'.")
@click.option("--paths", help="Comma-separated: same-node, cross-node [both].")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Directory for results.json, results.md and plots [bench-results/<time>].")
@click.option("--name", default=lambda: f"bench{os.getpid()}", show_default="bench<pid>",
              help="Name of the test bed this run brings up.")
@click.option("--proxy", type=click.Choice(PROXIES), default="envoy", show_default=True,
              help="The sidecar: Envoy (what Istio runs) or HAProxy (a second, independent proxy).")
@click.option("--mtls", type=click.Choice(MTLS_MODES),
              help="Sidecar-to-sidecar mutual TLS (Envoy only) [the test bed's default: Istio's, permissive].")
@click.option("--envoy-workers", type=click.IntRange(min=1, max=64), default=DEFAULT_ENVOY_WORKERS,
              show_default=True, help="Envoy worker threads per sidecar (Istio's default is 2).")
@click.option("--fixedrate-rps", type=click.IntRange(min=1), default=loads.FIXEDRATE_RPS, show_default=True,
              help="Total requests/s of the fixedrate load (Istio's method uses 1000).")
@click.option("--sidecar", type=click.Choice(["http", "tcp"]), default="http", show_default=True,
              help="How the sidecars proxy the HTTP loads' port: http (per request, reusing pooled upstream "
                   "connections, as Envoy does for a port Istio knows is HTTP) or tcp (one upstream connection "
                   "per client connection, as Envoy does for an opaque TCP port).")
@click.option("--family", type=click.Choice(loads.FAMILIES), default=loads.INET, show_default=True,
              help="The clients' sockets: inet (AF_INET to the server's IPv4 address), inet6 (AF_INET6 to its "
                   "IPv6 address) or mapped (AF_INET6 to ::ffff:<its IPv4 address>, as the JVM connects). inet6 "
                   "and mapped bring the test bed up dual-stack; tcp_rr (sockperf 3.7, IPv4 only) is refused with them.")
@click.option("--busy", "busy_levels", default=busy.NONE, show_default=True,
              help="Background CPU load on the client's node, comma-separated levels each case runs under: none, "
                   "half (stress-ng on half the cores), all (on every core); identical in every mode.")
@click.option("--no-plots", is_flag=True, help="Skip the PNG plots.")
def bench(quick, rounds, duration, warmup, modes, load_specs, paths, out, name, proxy, mtls, envoy_workers,
          fixedrate_rps, sidecar, family, busy_levels, no_plots):
    """Benchmark the sidecar data path in every mode on a fresh test bed.

    Brings up a test bed (2 nodes × 2 pods, Envoy or HAProxy sidecars, Istio's rules),
    runs rounds of nomesh / iptables / ebpf blocks, and writes results.json,
    results.md and PNG plots. Targets that are missed are reported, not errors.
    """
    if os.geteuid() != 0:
        raise click.UsageError("the benchmark builds a test bed of network namespaces and cgroups: run it as root")
    try:
        levels = busy.parse_levels(busy_levels)
        profile = _profile(quick, rounds, duration, warmup, _split(modes), load_specs, _split(paths), family, levels)
    except ValueError as e:
        raise click.UsageError(str(e)) from e
    if proxy == "haproxy" and mtls not in (None, "off"):
        raise click.UsageError(f"--mtls {mtls} needs --proxy envoy: HAProxy sidecars forward plain bytes")
    if proxy == "haproxy" and family != loads.INET:
        raise click.UsageError(f"--family {family} needs --proxy envoy: the HAProxy sidecar forwards IPv4 only")
    out = out or Path("bench-results") / datetime.now().strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)

    started = time.monotonic()
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    load_before = machine.load_average()
    steps = runner.plan(profile)
    cpu_count = os.cpu_count() or 1
    http_ports = (loads.HTTP_PORT,) if sidecar == "http" else ()
    with bedmod.testbed(name, mode=profile.modes[0], http_ports=http_ports, proxy=proxy, mtls=mtls,
                        envoy_workers=envoy_workers if proxy == "envoy" else None,
                        ip_families=ip_families(family)) as bed:
        mtls = bed.mtls
        command = reproduce_command(profile, quick, sidecar, proxy, mtls, envoy_workers, fixedrate_rps)
        click.echo(f"test bed {name} is up; {len(steps)} steps, about "
                   f"{format_duration(sum(s.weight for s in steps))} of planned work", err=True)
        bar = Progress(steps)
        try:
            outcome = runner.run(bed, profile, progress=bar, fixedrate_rps=fixedrate_rps, cpu_count=cpu_count)
        finally:
            bar.close()
        load_after = machine.load_average()
        try:
            handshakes = bed.tls_handshakes()
        except (RuntimeError, OSError) as e:
            handshakes = {"error": str(e)}
        machine_info = machine.collect(bed.namespaces())
        settle_how = bed.settle_how

    config = {"command": command, "quick": quick, "rounds": profile.rounds, "duration_s": profile.duration_s,
              "warmup_s": profile.warmup_s, "modes": list(profile.modes),
              "cases": [{"path": c.path, "load": c.load, "connections": c.connections} for c in profile.cases],
              "family": family, "family_how": loads.FAMILY_HOW[family], "ip_families": list(ip_families(family)),
              "pods": outcome.pods, "settle_how": settle_how, "sidecar": sidecar,
              "sidecar_how": sidecar_how(sidecar, proxy), "proxy": proxy,
              "proxy_version": machine_info["tools"].get(proxy), "mtls": mtls, "mtls_how": mtls_how(proxy, mtls),
              # since the sidecars last started (the last round's iptables and ebpf blocks)
              "tls_handshakes_last_round": handshakes,
              "envoy_workers": envoy_workers if proxy == "envoy" else None,
              "fixedrate": {"rps": fixedrate_rps, "payload_bytes": loads.FIXEDRATE_PAYLOAD_BYTES},
              "busy": list(levels), "busy_how": busy.how(levels, cpu_count),
              "loadavg_before": load_before, "loadavg_after": load_after,
              "started_at": started_at, "elapsed_s": time.monotonic() - started}
    doc = results.build(machine_info, config, outcome.rows, outcome.warmup_failures)
    schema.validate(doc)
    (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    plots: list[str] = []
    if not no_plots:
        try:
            from . import plots as plotmod
            plots = plotmod.plot(doc, out)
        except ImportError as e:
            click.echo(f"no plots: {e} (pip install matplotlib)", err=True)
    (out / "results.md").write_text(report.markdown(doc, plots))
    click.echo(report.console(doc))
    click.echo(f"\nwrote {out}/results.json, results.md" + (", " + ", ".join(plots) if plots else ""))


def reproduce_command(profile: runner.Profile, quick: bool, sidecar: str = "http", proxy: str = "envoy",
                      mtls: str | None = None, envoy_workers: int = DEFAULT_ENVOY_WORKERS,
                      fixedrate_rps: int = loads.FIXEDRATE_RPS) -> str:
    """The command line that runs exactly this profile again, whatever
    defaults were filled in (pass the bed's actual mTLS mode). Cases other
    than the profile's own always come from --loads x --paths, so those two
    options reproduce them."""
    argv = ["merbridge-py", "bench"] + (["--quick"] if quick else []) + [
        "--rounds", str(profile.rounds), "--duration", str(profile.duration_s), "--warmup", str(profile.warmup_s),
        "--modes", ",".join(profile.modes), "--proxy", proxy]
    if mtls is not None:
        argv += ["--mtls", mtls]
    if proxy == "envoy":
        argv += ["--envoy-workers", str(envoy_workers)]
    if sidecar != "http":
        argv += ["--sidecar", sidecar]
    if fixedrate_rps != loads.FIXEDRATE_RPS:
        argv += ["--fixedrate-rps", str(fixedrate_rps)]
    if profile.family != loads.INET:
        argv += ["--family", profile.family]
    levels = list(dict.fromkeys(c.busy for c in profile.cases))
    if levels != [busy.NONE]:
        argv += ["--busy", ",".join(levels)]
    base = runner.quick_profile() if quick else runner.full_profile()
    if tuple(c for c in profile.cases if c.busy == levels[0]) != tuple(
            runner.Case(c.path, c.load, c.connections, levels[0]) for c in base.cases):
        specs: dict[str, list[int]] = {}
        for c in profile.cases:
            conns = specs.setdefault(c.load, [])
            if c.connections not in conns:
                conns.append(c.connections)
        argv += ["--loads", " ".join(f"{load}:{','.join(map(str, conns))}" for load, conns in specs.items()),
                 "--paths", ",".join(dict.fromkeys(c.path for c in profile.cases))]
    return shlex.join(argv)


def ip_families(family: str) -> tuple[str, ...]:
    """The test bed's IP families for the clients' socket family: IPv4 only
    for inet (the bench as it always ran), dual stack for the AF_INET6 ones
    (a v4-mapped client needs the sidecars' IPv6 listeners, as in Istio's
    dual-stack sidecar, to be a JVM-like client of a dual-stack mesh)."""
    return ("ipv4",) if family == loads.INET else ("ipv4", "ipv6")


def _profile(quick, rounds, duration, warmup, modes, load_specs, paths, family=loads.INET,
             busy_levels=(busy.NONE,)) -> runner.Profile:
    base = runner.quick_profile() if quick else runner.full_profile()
    cases = tuple(runner.Case(c.path, c.load, c.connections, level) for level in busy_levels for c in base.cases)
    if load_specs or paths:
        specs = loads.parse_load_specs(list(load_specs)) if load_specs else \
            list(dict.fromkeys((c.load, c.connections) for c in base.cases))
        chosen_paths = paths or list(dict.fromkeys(c.path for c in base.cases))
        unknown = set(chosen_paths) - set(bedmod.PATHS)
        if unknown:
            raise ValueError(f"unknown path(s) {sorted(unknown)}; choose from {', '.join(bedmod.PATHS)}")
        cases = runner.cases_for(chosen_paths, specs, busy_levels)
    return runner.Profile(
        rounds=rounds or base.rounds,
        duration_s=duration or base.duration_s,
        warmup_s=base.warmup_s if warmup is None else warmup,
        modes=tuple(modes) if modes else base.modes,
        cases=cases,
        family=family,
    )
