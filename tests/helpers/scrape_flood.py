"""Load and probe for tests/test_agent_scrape_flood.py, run as separate
processes so neither is slowed by the other's (or pytest's) interpreter.

  scrape_flood.py flood HOST PORT SCRAPERS SECONDS
      SCRAPERS threads, each fetching /metrics back to back on a new
      connection for SECONDS; prints one JSON line: answers by status code,
      connection errors, and the largest merbridge_map_entries value seen.
  scrape_flood.py probe HOST PORT SECONDS INTERVAL
      GET /healthz and /readyz in turn every INTERVAL seconds, each with the
      kubelet's default 1 s timeout; prints one JSON line: the latency of
      every answer per path, every failure (timeout, error, non-200), and
      per path the time every attempt took, answered or not.
"""

from __future__ import annotations

import json
import re
import socket
import sys
import threading
import time

PROBE_TIMEOUT = 1.0        # the kubelet's default timeoutSeconds (our manifests give 2 s)
SCRAPE_TIMEOUT = 60.0      # a scraper waits long: a slow answer is the server's cost, not a failure here


def get(host: str, port: int, path: str, timeout: float) -> tuple[int, bytes]:
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.settimeout(timeout)
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    answer = b"".join(chunks)
    return int(answer.split(b" ", 2)[1]), answer


def flood(host: str, port: int, scrapers: int, seconds: float) -> dict:
    end = time.monotonic() + seconds
    lock = threading.Lock()
    codes: dict[str, int] = {}
    errors: list[str] = []
    largest = [0]

    def scraper():
        while time.monotonic() < end:
            try:
                code, answer = get(host, port, "/metrics", SCRAPE_TIMEOUT)
            except (OSError, ValueError, IndexError) as e:
                with lock:
                    errors.append(repr(e))
                continue
            with lock:
                codes[str(code)] = codes.get(str(code), 0) + 1
                if code == 200:
                    for v in re.findall(rb"^merbridge_map_entries\{[^}]*\} (\S+)$", answer, re.M):
                        largest[0] = max(largest[0], int(float(v)))
    threads = [threading.Thread(target=scraper, daemon=True) for _ in range(scrapers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + SCRAPE_TIMEOUT + 10)
    return {"codes": codes, "errors": len(errors), "first_errors": errors[:5], "largest_map_entries": largest[0]}


def probe(host: str, port: int, seconds: float, interval: float) -> dict:
    end = time.monotonic() + seconds
    latencies: dict[str, list[float]] = {"/healthz": [], "/readyz": []}
    attempts: dict[str, list[float]] = {"/healthz": [], "/readyz": []}
    failures: list[str] = []
    paths = list(latencies)
    n = 0
    while time.monotonic() < end:
        path = paths[n % len(paths)]
        n += 1
        start = time.monotonic()
        try:
            code, answer = get(host, port, path, PROBE_TIMEOUT)
            took = time.monotonic() - start
            if code != 200:
                failures.append(f"{path}: {code} after {took:.3f} s")
            elif took > PROBE_TIMEOUT:
                failures.append(f"{path}: answered after {took:.3f} s, past the probe timeout")
            else:
                latencies[path].append(took)
        except (OSError, ValueError, IndexError) as e:
            failures.append(f"{path}: {e!r} after {time.monotonic() - start:.3f} s")
        attempts[path].append(time.monotonic() - start)
        time.sleep(max(0.0, interval - (time.monotonic() - start)))
    return {"latencies": latencies, "attempts": attempts, "failures": failures}


def main() -> None:
    mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if mode == "flood":
        out = flood(host, port, int(sys.argv[4]), float(sys.argv[5]))
    else:
        out = probe(host, port, float(sys.argv[4]), float(sys.argv[5]))
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
