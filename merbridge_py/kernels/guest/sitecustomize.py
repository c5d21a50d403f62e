"""Kernel matrix, inside the guest only: time every bcc compile.

The matrix puts this directory first on PYTHONPATH in the VM (matrix.GUEST_ENV),
so every Python process there (pytest, the agent's loader child, the probes)
imports it at start. When a process imports bcc, `bcc.BPF.__init__` (the
compile from C source, and creating or opening the maps) is wrapped to append
one JSON line per compile to $MERBRIDGE_COMPILE_LOG: its seconds, and the
test that was running ($PYTEST_CURRENT_TEST, inherited by the agents a test
starts). After pytest the guest prints the lines and the host adds them up: the
share of a kernel's wall time spent compiling (docs/kernels.md).

Nothing here may break a process: any failure of the timer is ignored, and
without $MERBRIDGE_COMPILE_LOG it does nothing at all.
"""

import os
import sys

COMPILE_LOG_ENV = "MERBRIDGE_COMPILE_LOG"


def _wrap_bpf_init(bcc) -> None:
    import json
    import time

    original = bcc.BPF.__init__

    def timed_init(self, *args, **kwargs):
        started = time.monotonic()
        ok = False
        try:
            original(self, *args, **kwargs)
            ok = True
        finally:
            try:
                record = {"seconds": round(time.monotonic() - started, 2), "ok": ok,
                          "program": os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python",
                          "test": os.environ.get("PYTEST_CURRENT_TEST", "")}
                with open(os.environ[COMPILE_LOG_ENV], "a") as log:
                    log.write(json.dumps(record) + "\n")
            except Exception:  # noqa: BLE001 - a measurement must never fail the measured process
                pass

    bcc.BPF.__init__ = timed_init


class _TimeBccCompiles:
    """A meta path finder that lets the normal finders load bcc, then wraps it."""

    def find_spec(self, name, path=None, target=None):
        if name != "bcc":
            return None
        import importlib.util
        sys.meta_path.remove(self)          # find the real bcc, once
        spec = importlib.util.find_spec("bcc")
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_wrap(module):
            exec_module(module)
            try:
                _wrap_bpf_init(module)
            except Exception:  # noqa: BLE001 - see the module's docstring
                pass

        spec.loader.exec_module = exec_and_wrap
        return spec


if os.environ.get(COMPILE_LOG_ENV):
    sys.meta_path.insert(0, _TimeBccCompiles())
