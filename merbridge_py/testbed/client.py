"""HTTP client the test bed runs inside a source pod (its network namespace
and its cgroup, so the eBPF programs see it as that pod's app).

`python -m merbridge_py.testbed.client --host IP --port P [--path /whoami]
[--count N] [--new-connection] [--timeout S]` prints one JSON document:
{"results": [{"status": 200, "body": ..., "local": "ip:port", "error": null}, ...]}.
`body` is parsed JSON when the response is JSON, else text. A failed request
has status null and an error message; the exit code is 0 either way.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys


def _one(conn: http.client.HTTPConnection, path: str) -> dict:
    if conn.sock is None:
        conn.connect()  # http.client sets TCP_NODELAY
    local = "%s:%d" % conn.sock.getsockname()
    conn.request("GET", path)
    resp = conn.getresponse()
    raw = resp.read()
    body: object
    if resp.getheader("Content-Type", "").startswith("application/json"):
        body = json.loads(raw)
    else:
        body = raw.decode(errors="replace") if len(raw) <= 4096 else f"<{len(raw)} bytes>"
    return {"status": resp.status, "body": body, "local": local, "error": None}


def run(host: str, port: int, path: str, count: int, new_connection: bool, timeout: float) -> list[dict]:
    results = []
    conn = None
    for _ in range(count):
        if conn is None or new_connection:
            if conn is not None:
                conn.close()
            conn = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            results.append(_one(conn, path))
        except (OSError, http.client.HTTPException, ValueError) as e:
            results.append({"status": None, "body": None, "local": None, "error": f"{type(e).__name__}: {e}"})
            conn.close()
            conn = None
    if conn is not None:
        conn.close()
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m merbridge_py.testbed.client")
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/whoami")
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--new-connection", action="store_true", help="one connection per request")
    parser.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args(argv)
    results = run(args.host, args.port, args.path, args.count, args.new_connection, args.timeout)
    json.dump({"results": results}, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
