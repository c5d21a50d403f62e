"""`merbridge-py test-kernels`: the kernel matrix."""

from __future__ import annotations

from pathlib import Path

import click

from . import matrix

DEFAULT_CACHE = Path.home() / ".cache" / "merbridge-py" / "kernels"
PROJECT = Path(__file__).resolve().parents[2]

EXAMPLES = """
\b
examples:
  merbridge-py test-kernels                   # every kernel: 6.1, two 6.12s, 5.10 as the refusal
  merbridge-py test-kernels --only 6.12.118   # one kernel (a label or release substring)
  merbridge-py test-kernels --no-update       # resolve names from the apt lists already here
  merbridge-py test-kernels --only 6.1.0 --test tests/test_peer_name.py \\
      --test 'tests/test_byte_order.py::test_inbound_leg_writes_right_after_connect_arrive_in_order[idle]'
                                              # chosen tests only (node ids), not the list in matrix.py
  make test-kernels KERNELS_ARGS='--only 6.12.100 --test tests/test_kernel_probes.py'
"""


@click.command("test-kernels", epilog=EXAMPLES)
@click.option("--cache", type=click.Path(path_type=Path), default=DEFAULT_CACHE, show_default=True,
              help="where downloaded and unpacked kernel packages are kept between runs")
@click.option("--out", type=click.Path(path_type=Path), default=PROJECT / "build" / "kernels", show_default=True,
              help="console logs of each VM")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=PROJECT / "build" / "kernel-matrix.json",
              show_default=True)
@click.option("--only", multiple=True, help="run only kernels whose label or release contains this")
@click.option("--update/--no-update", default=True, help="refresh bullseye's private apt lists first")
@click.option("--test", "chosen", multiple=True, metavar="NODEID",
              help="run this pytest node id (tests/FILE.py[::TEST[PARAMS]]) in each kernel expected to pass, "
                   "instead of the matrix's list (KERNEL_TESTS in merbridge_py/kernels/matrix.py); repeatable. "
                   "5.10's refusal check stays as it is")
def test_kernels(cache, out, json_path, only, update, chosen):
    """Boot Debian's kernels under QEMU (software emulation) and run the kernel tests in each.

    Nothing is installed on the host: each kernel package is downloaded, unpacked
    into the cache and booted with the host's root read-only under a tmpfs overlay.
    Exits 1 when a kernel expected to pass fails or 5.10 is not refused."""
    if not PROJECT.joinpath("tests").is_dir():
        raise click.ClickException(f"{PROJECT} has no tests/: run from a source checkout")
    try:
        tests = matrix.chosen_tests(list(chosen), PROJECT)[0]
    except matrix.NodeIdError as e:
        raise click.BadParameter(str(e), param_hint="--test") from None
    rows = matrix.run_matrix(cache, PROJECT, out, list(only), update, echo=click.echo, tests=list(chosen))
    click.echo("")
    click.echo(matrix.table(rows))
    matrix.write_json(rows, json_path, tests)
    click.echo(f"\nwritten: {json_path}")
    booted = [r for r in rows if r.label != "host"]
    bad = [r for r in booted if not r.ok]
    # one closing line in the form CI's log reader counts ("N passed, N failed")
    click.echo(f"kernels: {len(booted) - len(bad)} passed, {len(bad)} failed")
    if bad:
        raise SystemExit(1)
