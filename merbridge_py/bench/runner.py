"""The order of a benchmark: rounds of interleaved mode blocks.

Round r runs every mode once, in the same order (A B C, A B C, ...): a slow
drift of a noisy machine then hits every mode alike, and ratios can be paired
by round. Each mode block starts from a clean state (the bed's settle(): no
conntrack entries or TIME_WAIT sockets left by the previous block), warms the
paths up with a short untimed keep-alive run, then runs every case once.
Every new-connection run settles again first: the TIME_WAIT sockets of the
run before it (same mode, other path) would otherwise cut its rate, and in
iptables mode by more than in the others, since REDIRECT funnels every
connection of a pod onto one sidecar listener (see the field notes).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone

from . import busy, loads
from .bed import CROSS_NODE, MODES, PATHS, SAME_NODE, Bed, pick_paths
from .measure import CLIENT_GRACE_S, Measurement, measure


@dataclass(frozen=True)
class Case:
    path: str
    load: str
    connections: int
    busy: str = busy.NONE     # the node's background CPU load (busy.LEVELS)

    def __post_init__(self):
        if self.busy not in busy.LEVELS:
            raise ValueError(f"busy must be among {busy.LEVELS}, got {self.busy!r}")

    @property
    def label(self) -> str:
        return f"{self.path} {self.load} c={self.connections}" + ("" if self.busy == busy.NONE else
                                                                   f" busy={self.busy}")


@dataclass(frozen=True)
class Profile:
    rounds: int
    duration_s: int
    warmup_s: int
    modes: tuple[str, ...]
    cases: tuple[Case, ...]
    # the client sockets' family (loads.FAMILIES): every case and warm-up uses it
    family: str = loads.INET

    def __post_init__(self):
        if self.rounds < 1 or self.duration_s < 1 or self.warmup_s < 0:
            raise ValueError("rounds and duration must be >= 1, warm-up >= 0")
        unknown = set(self.modes) - set(MODES)
        if unknown or not self.modes:
            raise ValueError(f"modes must be among {MODES}, got {self.modes}")
        loads.check_family(self.family, [c.load for c in self.cases])


def cases_for(paths: Sequence[str], specs: Sequence[tuple[str, int]],
              busy_levels: Sequence[str] = (busy.NONE,)) -> tuple[Case, ...]:
    """Busy level outermost: a mode block starts each level's background load
    once and runs all of that level's cases under it."""
    return tuple(Case(path, load, c, level) for level in busy_levels for path in paths for load, c in specs)


FULL_LOADS = loads.parse_load_specs(["keepalive:1,4,16,64", "newconn", "tcp_rr", "bulk", "fixedrate"])


# The sign test ("never worse than iptables", stats.py) resolves nothing below 5
# pairs and, at 10, a split of 9-1 or clearer: the full run has 10 rounds.
FULL_ROUNDS = 10


def full_profile() -> Profile:
    return Profile(rounds=FULL_ROUNDS, duration_s=5, warmup_s=2, modes=MODES, cases=cases_for(PATHS, FULL_LOADS))


def quick_profile() -> Profile:
    """The cases the issue's targets name, and nothing else: 3 rounds of 2 s.
    With three modes that is 36 measurements, about 80 s of load. Three pairs
    are too few for the sign test: its verdicts say "not resolved"."""
    cases = (Case(SAME_NODE, loads.KEEPALIVE, 1), Case(SAME_NODE, loads.KEEPALIVE, 16),
             Case(SAME_NODE, loads.NEWCONN, loads.DEFAULT_CONNECTIONS[loads.NEWCONN]),
             Case(CROSS_NODE, loads.KEEPALIVE, 1))
    return Profile(rounds=3, duration_s=2, warmup_s=1, modes=MODES, cases=cases)


# --- plan --------------------------------------------------------------------------

# Planned seconds for what is not load: switching mode (starting an agent
# compiles eBPF), settling, process start-up. Only the progress bar uses them.
MODE_SWITCH_S = 3.0
RUN_OVERHEAD_S = 0.5


@dataclass(frozen=True)
class Step:
    kind: str            # "mode" (switch + settle), "warmup" or "run"
    round: int
    mode: str
    case: Case | None = None
    weight: float = 0.0  # planned seconds, for the progress bar

    @property
    def label(self) -> str:
        if self.kind == "mode":
            return f"round {self.round + 1}: now in {self.mode} mode"
        if self.kind == "warmup":
            return f"round {self.round + 1} {self.mode}: warm-up {self.case.path}"
        return f"round {self.round + 1} {self.mode}: {self.case.label}"


def plan(profile: Profile) -> list[Step]:
    steps: list[Step] = []
    paths = list(dict.fromkeys(c.path for c in profile.cases))
    for r in range(profile.rounds):
        for mode in profile.modes:
            steps.append(Step("mode", r, mode, weight=MODE_SWITCH_S))
            if profile.warmup_s:
                steps += [Step("warmup", r, mode, Case(p, loads.KEEPALIVE, 1), profile.warmup_s + RUN_OVERHEAD_S)
                          for p in paths]
            steps += [Step("run", r, mode, c, profile.duration_s + RUN_OVERHEAD_S) for c in profile.cases]
    return steps


# --- execution ------------------------------------------------------------------

Measure = Callable[..., Measurement]
Progress = Callable[[Step], None]


@dataclass
class Outcome:
    rows: list[dict] = field(default_factory=list)
    warmup_failures: list[str] = field(default_factory=list)
    # path -> {"client": pod, "server": pod, "client_ip", "server_ip"}: who talked to whom
    pods: dict[str, dict[str, str]] = field(default_factory=dict)


def run(bed: Bed, profile: Profile, progress: Progress = lambda step: None,
        measure_fn: Measure = measure, fixedrate_rps: int = loads.FIXEDRATE_RPS,
        cpu_count: int | None = None) -> Outcome:
    """Execute the plan. A measurement that fails becomes a row with ok=false
    and its error; the benchmark goes on, because a mode that breaks under one
    load is a finding, and the other measurements are still worth having."""
    pairs = pick_paths(bed.pods)
    # what the clients connect to; fails here (ValueError), before any load,
    # when the family needs an address the bed's pods lack
    targets = {path: loads.target(profile.family, p.server.ip, p.server.ip6) for path, p in pairs.items()}
    outcome = Outcome(pods={path: {"client": p.client.name, "client_ip": p.client.ip, "server": p.server.name,
                                   "server_ip": p.server.ip, "family": profile.family,
                                   "target": targets[path].address} for path, p in pairs.items()})
    block_error: str | None = None
    steps = plan(profile)
    busy_node = next(iter(pairs.values())).client.node    # both paths start from this client
    with _wrk_scripts(fixedrate_rps) as script, contextlib.ExitStack() as background:
        level, workers = busy.NONE, 0
        for i, step in enumerate(steps):
            if step.kind == "mode" or (step.kind == "run" and step.case.busy != level):
                background.close()            # stopped before a mode switch, and between levels
                level, workers = busy.NONE, 0
            if step.kind == "run" and step.case.busy != level and block_error is None:
                level = step.case.busy
                try:
                    workers = background.enter_context(busy.background(
                        bed, busy_node, level, _busy_timeout_s(steps, i, profile), cpu_count))
                except (RuntimeError, OSError) as e:
                    block_error = f"starting the busy-node load ({level}) failed: {type(e).__name__}: {e}"
            if step.kind == "mode":
                block_error = _enter_mode(bed, step.mode)
            elif block_error is not None:
                if step.kind == "run":
                    outcome.rows.append(_row(step, profile, error=block_error, busy_workers=workers))
            elif step.kind == "warmup":
                try:
                    measure_fn(bed, pairs[step.case.path], step.case.load, step.case.connections,
                               profile.warmup_s, script, family=profile.family)
                except Exception as e:  # noqa: BLE001 - reported, and the block still runs
                    outcome.warmup_failures.append(f"{step.label}: {e}")
            else:
                started = datetime.now(timezone.utc).isoformat(timespec="seconds")
                try:
                    if step.case.load == loads.NEWCONN:
                        bed.settle()
                    m = measure_fn(bed, pairs[step.case.path], step.case.load, step.case.connections,
                                   profile.duration_s, script, family=profile.family)
                except (loads.LoadFailed, TimeoutError, RuntimeError, OSError) as e:
                    outcome.rows.append(_row(step, profile, started=started, error=f"{type(e).__name__}: {e}",
                                             busy_workers=workers))
                else:
                    outcome.rows.append(_row(step, profile, started=started, m=m, busy_workers=workers))
            progress(step)
    return outcome


def _busy_timeout_s(steps: Sequence[Step], first: int, profile: Profile) -> int:
    """A backstop for the background load's own --timeout: every run of its
    level in this mode block, with the client's grace, and a minute more."""
    level, n = steps[first].case.busy, 0
    for step in steps[first:]:
        if step.kind != "run" or step.case.busy != level:
            break
        n += 1
    return n * (profile.duration_s + int(CLIENT_GRACE_S) + 10) + 60


def _enter_mode(bed: Bed, mode: str) -> str | None:
    try:
        bed.set_mode(mode)
        bed.settle()
    except (RuntimeError, OSError) as e:   # SandboxError and TestbedError are RuntimeErrors
        return f"switching to {mode} failed: {type(e).__name__}: {e}"
    return None


def _row(step: Step, profile: Profile, started: str | None = None, m: Measurement | None = None,
         error: str | None = None, busy_workers: int = 0) -> dict:
    c = step.case
    row = {"round": step.round, "mode": step.mode, "path": c.path, "load": c.load, "connections": c.connections,
           "busy": c.busy, "busy_workers": busy_workers,
           "family": profile.family, "planned_duration_s": profile.duration_s, "started_at": started, "ok": m is not None, "error": error}
    r = m.result if m else None
    row.update({
        "duration_s": r.duration_s if r else None,
        "requests": r.requests if r else None,
        "rps": r.rps if r else None,
        "p50_us": r.p50_us if r else None,
        "p90_us": r.p90_us if r else None,
        "p99_us": r.p99_us if r else None,
        "errors": r.errors if r else None,
        "bytes": r.bytes if r else None,
        "throughput_bps": r.throughput_bps if r else None,
        "retransmits": r.retransmits if r else None,
        "late_slots": r.late_slots if r else None,
        "wrk_corrected_p99_us": r.wrk_corrected_p99_us if r else None,
        "cpu_us": dict(m.cpu_us) if m else None,
        "cpu_us_per_req": m.cpu_us_per_req if m else None,
        "cpu_user_us": dict(m.cpu_user_us) if m and m.cpu_user_us else None,
        "sidecar_user_us_per_req": m.sidecar_user_us_per_req if m else None,
        "kernel_us_per_req": m.kernel_us_per_req if m else None,
        "datapath": m.datapath if m and m.datapath else None,
        "nat_redirects": dict(m.nat_redirects) if m and m.nat_redirects else None,
        "tcp": {role: dict(c) for role, c in m.tcp.items()} if m and m.tcp else None,
    })
    return row


@contextlib.contextmanager
def _wrk_scripts(fixedrate_rps: int = loads.FIXEDRATE_RPS) -> Iterator[loads.WrkScripts]:
    """The wrk scripts as files every pod can read: namespaces share the file
    system, only the network is private."""
    with tempfile.TemporaryDirectory(prefix="mbp-bench-") as tmp:
        os.chmod(tmp, 0o755)
        paths = {}
        for name, text in (("report", loads.WRK_REPORT_LUA), ("fixedrate", loads.WRK_FIXEDRATE_LUA)):
            paths[name] = os.path.join(tmp, f"{name}.lua")
            with open(paths[name], "w") as f:
                f.write(text)
        yield loads.WrkScripts(**paths, fixedrate_rps=fixedrate_rps)

