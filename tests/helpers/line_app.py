"""The test app: for every line received, answers "<name> <peer ip:port>";
a line "echo N" switches the connection to echoing the next N bytes back.

    python line_app.py --name POD [--port 8080]
"""

import argparse
import socket
import threading


def handle(conn: socket.socket, name: str) -> None:
    peer = "%s:%d" % conn.getpeername()
    f = conn.makefile("rb")
    try:
        for line in f:
            if line.startswith(b"echo "):
                left = int(line.split()[1])
                while left:
                    chunk = f.read1(min(left, 1 << 18))
                    if not chunk:
                        return
                    conn.sendall(chunk)
                    left -= len(chunk)
                continue
            conn.sendall(f"{name} {peer}\n".encode())
    except OSError:
        pass
    finally:
        conn.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", required=True)
    ap.add_argument("--port", type=int, default=8080)
    args = ap.parse_args()
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("0.0.0.0", args.port))
    ls.listen(512)
    print("ready", flush=True)
    while True:
        conn, _ = ls.accept()
        threading.Thread(target=handle, args=(conn, args.name), daemon=True).start()


if __name__ == "__main__":
    main()
