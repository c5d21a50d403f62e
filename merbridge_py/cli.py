"""The `merbridge-py` command.

Subcommands live in their own modules and are imported only when invoked, so
`merbridge-py inspect-pod` does not pay for importing bcc (and LLVM) and a
machine without bcc can still run the commands that do not need it.
"""

import importlib

import click

# name -> "module:attribute" of a click command
SUBCOMMANDS = {
    "run": "merbridge_py.agent.cli:run",
    "doctor": "merbridge_py.doctor:doctor",
    "inspect-pod": "merbridge_py.inspect:inspect_pod",
    "status": "merbridge_py.agent.status:status",
    "toggle": "merbridge_py.toggle:toggle",
    "cleanup": "merbridge_py.cleanup:cleanup",
    "manifests": "merbridge_py.manifests:manifests",
    "testbed": "merbridge_py.testbed.cli:testbed",
    "bench": "merbridge_py.bench.cli:bench",
    "test-kernels": "merbridge_py.kernels.cli:test_kernels",
}

EXAMPLES = """
\b
examples:
  merbridge-py doctor                      # can this node run the datapath?
  merbridge-py run --cgroup /sys/fs/cgroup/kubepods --pods-file pods.yaml
  merbridge-py inspect-pod pod.yaml        # would this pod be accelerated, and why
  merbridge-py testbed up --nodes 2 --pods-per-node 2 --mode ebpf
  merbridge-py bench --quick               # iptables vs eBPF vs no mesh, on this kernel
"""


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(SUBCOMMANDS)

    def get_command(self, ctx, name):
        target = SUBCOMMANDS.get(name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        return getattr(importlib.import_module(module_name), attr)


@click.group(cls=LazyGroup, epilog=EXAMPLES, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="merbridge-py")
def main():
    """Replace Istio's iptables interception with eBPF on this node."""


if __name__ == "__main__":
    main()
