"""HTTP client the test bed runs inside a source pod (its network namespace
and its cgroup, so the eBPF programs see it as that pod's app).

`python -m merbridge_py.testbed.client --host IP --port P [--path /whoami]
[--count N] [--new-connection] [--timeout S] [--family inet|inet6]` prints one
JSON document:
{"results": [{"status": 200, "body": ..., "local": "ip:port", "peer": "ip:port", "error": null}, ...]}.
`local` and `peer` are the client socket's getsockname() and getpeername()
(what the app itself can observe), "[ip]:port" for an IPv6 socket. IP may be IPv4 or IPv6. `--family
inet6` with an IPv4 address connects an AF_INET6 socket to the v4-mapped
address ::ffff:a.b.c.d, as the JVM (and any dual-stack socket) does: the
kernel runs the IPv6 hooks (connect6) for it, the packets are IPv4.
`body` is parsed JSON when the response is JSON, else text. A failed request
has status null and an error message; the exit code is 0 either way.
"""

from __future__ import annotations

import argparse
import http.client
import ipaddress
import json
import sys

FAMILIES = ("inet", "inet6")


def target_address(host: str, family: str | None) -> str:
    """The address a socket of `family` connects to for `host`: the host
    itself, or the v4-mapped form of an IPv4 host for "inet6". None: the
    host's own family."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        if family is None:
            return host        # a name: the resolver picks
        raise ValueError(f"--family needs an IP address, got {host!r}") from None
    if family is None or family == ("inet" if ip.version == 4 else "inet6"):
        return str(ip)
    if family == "inet6":
        return f"::ffff:{ip}"
    if family == "inet":
        raise ValueError(f"an AF_INET socket cannot reach the IPv6 address {host}")
    raise ValueError(f"family {family!r}: one of {', '.join(FAMILIES)}")


def format_address(address: tuple) -> str:
    """"ip:port", or "[ip]:port" for IPv6 (a socket address tuple of either family)."""
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _one(conn: http.client.HTTPConnection, path: str, authority: str | None = None) -> dict:
    if conn.sock is None:
        conn.connect()  # http.client sets TCP_NODELAY
    local = format_address(conn.sock.getsockname())
    peer = format_address(conn.sock.getpeername())
    conn.request("GET", path, headers={"Host": authority} if authority else {})
    resp = conn.getresponse()
    raw = resp.read()
    body: object
    if resp.getheader("Content-Type", "").startswith("application/json"):
        body = json.loads(raw)
    else:
        body = raw.decode(errors="replace") if len(raw) <= 4096 else f"<{len(raw)} bytes>"
    return {"status": resp.status, "body": body, "local": local, "peer": peer, "error": None}


def run(host: str, port: int, path: str, count: int, new_connection: bool, timeout: float,
        family: str | None = None) -> list[dict]:
    """`count` GETs to host:port. The Host header names `host` as given even
    when the socket reaches it v4-mapped (a JVM client sends the URL's host,
    and the sidecar routes HTTP by it)."""
    address = target_address(host, family)
    authority = format_address((host, port)) if address != host else None
    results = []
    conn = None
    for _ in range(count):
        if conn is None or new_connection:
            if conn is not None:
                conn.close()
            conn = http.client.HTTPConnection(address, port, timeout=timeout)
        try:
            results.append(_one(conn, path, authority))
        except (OSError, http.client.HTTPException, ValueError) as e:
            results.append({"status": None, "body": None, "local": None, "peer": None,
                            "error": f"{type(e).__name__}: {e}"})
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
    parser.add_argument("--family", choices=FAMILIES,
                        help="socket family (default: the address's); inet6 to an IPv4 address uses ::ffff:a.b.c.d")
    args = parser.parse_args(argv)
    try:
        target_address(args.host, args.family)
    except ValueError as e:
        parser.error(str(e))
    results = run(args.host, args.port, args.path, args.count, args.new_connection, args.timeout, args.family)
    json.dump({"results": results}, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
