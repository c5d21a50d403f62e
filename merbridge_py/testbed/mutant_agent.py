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
program text it compiles, the user-namespace step of its decision) and then
runs the real agent: `python -m merbridge_py.testbed.mutant_agent MUTANT run ...`.
"""

from __future__ import annotations

import re
import sys

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


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in MUTANTS:
        sys.exit(f"usage: python -m merbridge_py.testbed.mutant_agent {{{','.join(MUTANTS)}}} run ...")
    MUTANTS[argv[0]]()
    from merbridge_py.cli import main as cli_main
    cli_main(args=argv[1:], prog_name="merbridge-py")


if __name__ == "__main__":
    main(sys.argv[1:])
