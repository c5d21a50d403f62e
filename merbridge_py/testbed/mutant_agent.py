"""The agent with one deliberately wrong policy, for tests only: the proof
that the equivalence matrix (tests/test_equivalence_matrix.py) fails when
the eBPF datapath differs from Istio's rules in a way an application can
see. The test bed starts it instead of `merbridge-py run` when its
`agent_mutant` is set; the product never imports this module.

  peer-is-sidecar     the getpeername hooks answer as the kernel does: a
                      redirected socket shows its sidecar's listener
                      (127.0.0.2:15001) as its peer, not the destination it
                      dialled (the agent before issue 20's peer address)
  proxy-uid-unmapped  a user-namespaced pod's proxy uid/gid are taken as
                      written in its rules (1337), not as the host sees them
                      (101337): the proxy's own connections are redirected
                      back into its outbound listener (the bug issue 20
                      reports for hostUsers: false pods)

Each mutant changes one thing through a seam of the agent's own code (the
program text its loader child compiles, the user-namespace step of its
decision) and then runs the real agent: `python -m
merbridge_py.testbed.mutant_agent MUTANT run ...`. The agent compiles in a
child (`python -m merbridge_py.loader`, datapath.run_loader); the mutant
agent starts that child as `python -m merbridge_py.testbed.mutant_agent
MUTANT loader ...`, so the child gets the same change.
"""

from __future__ import annotations

import re
import subprocess
import sys
import types

_GETPEERNAME = re.compile(r"(int sock[46]_getpeername\(struct bpf_sock_addr \*ctx\)\s*\{)")


def _peer_is_sidecar() -> None:
    from merbridge_py import datapath
    real = datapath.program_text

    def program_text(directory=None) -> str:
        text, n = _GETPEERNAME.subn(r"\1\n    return 1;   /* mutant: leave the kernel's answer */", real(directory))
        if n != 2:
            raise RuntimeError(f"mutant peer-is-sidecar: found {n} getpeername programs, expected 2")
        return text

    datapath.program_text = program_text


def _proxy_uid_unmapped() -> None:
    from merbridge_py.agent import core
    core.in_user_namespace = lambda verdict, maps: verdict


MUTANTS = {"peer-is-sidecar": _peer_is_sidecar, "proxy-uid-unmapped": _proxy_uid_unmapped}
LOADER = ["-m", "merbridge_py.loader"]


def _loader_children_too(mutant: str) -> None:
    """datapath.run_loader starts `python -m merbridge_py.loader ...`: start
    this module's loader role with the same mutant instead (every other
    command datapath runs is left as it is)."""
    from merbridge_py import datapath

    def run(argv, *args, **kwargs):
        if list(argv[1:3]) == LOADER:
            argv = [argv[0], "-m", __spec__.name, mutant, "loader", *argv[3:]]
        return subprocess.run(argv, *args, **kwargs)

    datapath.subprocess = types.SimpleNamespace(**{**vars(subprocess), "run": run})


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[0] not in MUTANTS:
        sys.exit(f"usage: python -m merbridge_py.testbed.mutant_agent {{{','.join(MUTANTS)}}} run|loader ...")
    mutant, role = argv[0], argv[1]
    MUTANTS[mutant]()
    if role == "loader":
        from merbridge_py.loader import main as loader_main
        sys.exit(loader_main(argv[2:]))
    _loader_children_too(mutant)
    from merbridge_py.cli import main as cli_main
    cli_main(args=argv[1:], prog_name="merbridge-py")


if __name__ == "__main__":
    main(sys.argv[1:])
