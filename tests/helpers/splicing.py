"""Whether the kernel probes let this node splice, asked as the agent asks
at start (merbridge_py.kernel_probes.probe_kernel), so that an end-to-end
test expects spliced bytes only where the agents splice (not on 6.1, where
FIONREAD would hide redirected bytes), or forces the splice where they would not."""

from __future__ import annotations

from merbridge_py import kernel_probes


def probes_allow_splicing() -> bool:
    """The splice mode the kernel probes pick here is not off."""
    return kernel_probes.probe_kernel().splice_mode != kernel_probes.SPLICE_OFF
