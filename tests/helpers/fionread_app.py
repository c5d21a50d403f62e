"""An app that checks FIONREAD at every readable moment, as runtimes that
size their reads with it do (Java's available(), .NET, nginx with
edge-triggered epoll): select() says readable -> ioctl(FIONREAD) -> recv().
A moment where FIONREAD said 0 while recv() returned data is a lie an app
can stall on; they are counted.

    python fionread_app.py serve --port 9300
    python fionread_app.py client --host IP --port 9300 --up N --down N [--stream offsets]
    python fionread_app.py put-get --host IP --port 9302 --path /upload/x --bytes N

Protocol, one exchange per connection: the client sends "up N down M\\n" and
N bytes; the server reads them with the checks, answers its counts as one
JSON line, then sends M bytes, which the client reads with the checks. The
client prints {"up": server's counts, "down": its own, "peer" and "local":
its socket's getpeername() and getsockname()} as JSON; when a send of the
upload fails, {"send_error", "sent": bytes sent before, "seconds", "peer",
"local"}. The bytes are a
pattern depending on the offset, so a reordering shows as corruption; with
"stream offsets" (the request line "up N down M stream offsets") every
4 KiB block starts with its own offset, so no block of the stream equals
another and a displaced, lost or repeated block is caught wherever it is.

put-get: an HTTP client for a WebDAV-enabled server (nginx's dav_methods PUT):
PUT N pattern bytes to --path, then GET them back on the same connection,
reading the response with the checks. Prints {"put_status", "put_seconds",
"get_status", "down": its counts} as JSON.
"""

import argparse
import fcntl
import json
import select
import socket
import struct
import sys
import termios
import threading
import time

CHUNK = 1 << 16


# A block of a prime length repeated: bytes at different offsets differ, so a
# reordering or a lost chunk shows as corruption, and it costs nothing to make.
_BLOCK_LEN = 1048573
_BLOCK = bytes((i * 7 + i // 251) & 0xFF for i in range(_BLOCK_LEN)) * 2


def pattern(offset: int, n: int) -> bytes:
    """Bytes offset..offset+n of the stream (n <= _BLOCK_LEN)."""
    start = offset % _BLOCK_LEN
    return _BLOCK[start:start + n]


# The pattern's period (a prime) is long but finite: a block displaced by a
# multiple of it would compare equal. This stream names its own offsets: each
# OFFSET_BLOCK-byte block starts with its offset (8 bytes, big-endian), the
# pattern fills the rest.
OFFSET_BLOCK = 4096


def offset_stream(offset: int, n: int) -> bytes:
    """Bytes offset..offset+n of the self-naming stream."""
    first = offset - offset % OFFSET_BLOCK
    parts = []
    for block in range(first, offset + n, OFFSET_BLOCK):
        parts.append(block.to_bytes(8, "big"))
        parts.append(pattern(block + 8, OFFSET_BLOCK - 8))
    return b"".join(parts)[offset - first:offset - first + n]


STREAMS = {"pattern": pattern, "offsets": offset_stream}


class CheckedReader:
    def __init__(self, sock: socket.socket, stream=pattern):
        self.sock, self.buf, self.stream = sock, bytearray(), stream
        self.readable = self.zero_while_data = self.bytes = 0
        self.offset = 0          # of the checked payload
        self.corrupt = 0
        self.first_corrupt = None    # the offset of the first chunk that differed
        self.started = self.finished = None

    def _fill(self) -> bool:
        select.select([self.sock], [], [])
        avail = struct.unpack("i", fcntl.ioctl(self.sock.fileno(), termios.FIONREAD, struct.pack("i", 0)))[0]
        try:
            data = self.sock.recv(1 << 20, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True          # a wake-up without data: nothing to check
        self.readable += 1
        if data and avail == 0:
            self.zero_while_data += 1
        self.buf += data
        return bool(data)

    def line(self) -> bytes:
        while b"\n" not in self.buf:
            if not self._fill():
                raise EOFError("connection closed before a full line")
        i = self.buf.index(b"\n")
        out = bytes(self.buf[:i])
        del self.buf[:i + 1]
        return out

    def payload(self, n: int) -> None:
        """Read and check n pattern bytes."""
        self.started = time.monotonic()
        while self.bytes < n:
            if not self.buf and not self._fill():
                break
            take = bytes(self.buf[:min(n - self.bytes, CHUNK)])
            del self.buf[:len(take)]
            if take != self.stream(self.offset, len(take)):
                self.corrupt += 1
                if self.first_corrupt is None:
                    self.first_corrupt = self.offset
            self.offset += len(take)
            self.bytes += len(take)
        self.finished = time.monotonic()

    def raw(self, n: int) -> bytes:
        """n bytes, unchecked (an HTTP response body that is not the pattern)."""
        while len(self.buf) < n:
            if not self._fill():
                raise EOFError(f"connection closed {n - len(self.buf)} bytes before the end of a body")
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def http_head(self) -> tuple[int, dict[str, str]]:
        """An HTTP response's status and headers (names lowercased)."""
        status = int(self.line().split()[1])
        headers = {}
        while True:
            line = self.line().rstrip(b"\r")
            if not line:
                return status, headers
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()

    def counts(self) -> dict:
        counts = {"bytes": self.bytes, "readable": self.readable, "zero_while_data": self.zero_while_data,
                  "corrupt_chunks": self.corrupt, "first_corrupt_offset": self.first_corrupt}
        if self.started is not None:
            counts["seconds"] = round(self.finished - self.started, 3)
        return counts


def send_pattern(sock: socket.socket, n: int, stream=pattern, progress: dict | None = None) -> None:
    """Send n bytes of `stream`; `progress["sent"]` says how far it got (when a send fails)."""
    progress = {} if progress is None else progress
    progress["sent"] = sent = 0
    while sent < n:
        chunk = stream(sent, min(CHUNK, n - sent))
        sock.sendall(chunk)
        progress["sent"] = sent = sent + len(chunk)


def serve_one(conn: socket.socket) -> None:
    with conn:
        reader = CheckedReader(conn)
        words = reader.line().split()
        up, down = int(words[1]), int(words[3])
        # "up N down M" or "up N down M stream NAME"
        reader.stream = stream = STREAMS[words[5].decode()] if len(words) >= 6 else pattern
        reader.payload(up)
        conn.sendall(json.dumps(reader.counts()).encode() + b"\n")
        send_pattern(conn, down, stream)
        conn.shutdown(socket.SHUT_WR)
        conn.recv(1)             # the client closes first


def serve(port: int) -> None:
    listener = socket.create_server(("0.0.0.0", port), backlog=64)
    print("ready", flush=True)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve_one, args=(conn,), daemon=True).start()


def format_address(address: tuple) -> str:
    """"ip:port", or "[ip]:port" for IPv6 (merbridge_py.testbed.client's format; this file runs alone)."""
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def client(host: str, port: int, up: int, down: int, stream: str = "pattern") -> dict:
    with socket.create_connection((host, port), timeout=120) as sock:
        # what the app sees of its own connection, asked as a Go or Java runtime would, right after connect
        peer, local = format_address(sock.getpeername()), format_address(sock.getsockname())
        request = f"up {up} down {down}" + (f" stream {stream}" if stream != "pattern" else "")
        sock.sendall(f"{request}\n".encode())
        progress, started = {}, time.monotonic()
        try:
            send_pattern(sock, up, STREAMS[stream], progress)
        except OSError as e:
            # an error the app sees (ENOMEM from a redirect, a reset): said with how far it got
            return {"send_error": str(e), "sent": progress["sent"], "seconds": round(time.monotonic() - started, 3),
                    "peer": peer, "local": local}
        reader = CheckedReader(sock, STREAMS[stream])
        server_counts = json.loads(reader.line())
        reader.payload(down)
        return {"up": server_counts, "down": reader.counts(), "peer": peer, "local": local,
                "peer_after": format_address(sock.getpeername())}


def put_get(host: str, port: int, path: str, n: int) -> dict:
    with socket.create_connection((host, port), timeout=300) as sock:
        started = time.monotonic()
        sock.sendall(f"PUT {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {n}\r\n\r\n".encode())
        send_pattern(sock, n)
        reader = CheckedReader(sock)
        put_status, headers = reader.http_head()
        reader.raw(int(headers.get("content-length", 0)))
        put_seconds = time.monotonic() - started
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        get_status, headers = reader.http_head()
        length = int(headers.get("content-length", 0))
        if get_status == 200:
            reader.payload(length)
        else:
            reader.raw(length)
        return {"put_status": put_status, "put_seconds": round(put_seconds, 3), "get_status": get_status,
                "down": reader.counts()}


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--port", type=int, required=True)
    c = sub.add_parser("client")
    c.add_argument("--host", required=True)
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--up", type=int, default=0)
    c.add_argument("--down", type=int, default=0)
    c.add_argument("--stream", choices=sorted(STREAMS), default="pattern")
    h = sub.add_parser("put-get")
    h.add_argument("--host", required=True)
    h.add_argument("--port", type=int, required=True)
    h.add_argument("--path", required=True)
    h.add_argument("--bytes", type=int, required=True)
    args = parser.parse_args()
    if args.cmd == "serve":
        serve(args.port)
    elif args.cmd == "put-get":
        print(json.dumps(put_get(args.host, args.port, args.path, args.bytes)))
    else:
        result = client(args.host, args.port, args.up, args.down, args.stream)
        print(json.dumps(result), flush=True)
        if "send_error" in result:
            sys.exit(f"the upload failed after {result['sent']} of {args.up} bytes: {result['send_error']}")


if __name__ == "__main__":
    main()
