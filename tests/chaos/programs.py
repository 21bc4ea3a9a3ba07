"""Tiny network programs the chaos self-tests run inside namespace hosts.

Standard library only (run with `python -I`), one subcommand each:

  serve IP PORT            TCP echo + UDP sink: logs "udp <payload> from <ip>" per datagram
  tcp-echo IP PORT         exit 0 if a line comes back echoed within --timeout, else 1
  udp-send IP PORT TAG     send --count datagrams "TAG <n>"
  register IP PORT FILE    a versioned register over JSON lines, writes fsynced to FILE
                           before they are answered; with --primary ADDR --lag S a
                           replica that forwards writes but serves reads from a copy
                           refreshed every S seconds (deliberately stale)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import socketserver
import sys
import threading
import time


def serve(args) -> None:
    class Echo(socketserver.StreamRequestHandler):
        def handle(self):
            for line in self.rfile:
                self.wfile.write(line)

    socketserver.ThreadingTCPServer.allow_reuse_address = True
    socketserver.ThreadingTCPServer.daemon_threads = True
    tcp = socketserver.ThreadingTCPServer((args.ip, args.port), Echo)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((args.ip, args.port))

    def sink():
        while True:
            data, (src, _) = udp.recvfrom(65536)
            sys.stdout.write(f"udp {data.decode(errors='replace')} from {src}\n")
            sys.stdout.flush()

    threading.Thread(target=sink, daemon=True).start()
    sys.stdout.write(f"serving {args.ip}:{args.port}\n")
    sys.stdout.flush()
    tcp.serve_forever()


def tcp_echo(args) -> int:
    try:
        with socket.create_connection((args.ip, args.port), timeout=args.timeout) as s:
            s.sendall(b"ping\n")
            return 0 if s.makefile("rb").readline() == b"ping\n" else 1
    except OSError:
        return 1


def udp_send(args) -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for n in range(args.count):
        try:
            s.sendto(f"{args.tag} {n}".encode(), (args.ip, args.port))
        except PermissionError:
            pass  # an OUTPUT DROP rule answers EPERM to the sender: the datagram is dropped
    return 0


class Register:
    """key -> [value, index]; one index counter across keys, like a log index."""

    def __init__(self, path: str) -> None:
        self.lock = threading.Lock()
        self.data: dict[str, list] = {}
        self.index = 0
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    if line.endswith("\n"):  # a torn last line was never acknowledged
                        self._apply(json.loads(line))
        self.log = open(path, "a")

    def _apply(self, rec) -> None:
        self.index = max(self.index, rec["index"])
        if rec["value"] is None:
            self.data.pop(rec["key"], None)
        else:
            self.data[rec["key"]] = [rec["value"], rec["index"]]

    def _write(self, key, value) -> int:
        rec = {"key": key, "value": value, "index": self.index + 1}
        self.log.write(json.dumps(rec) + "\n")
        self.log.flush()
        os.fsync(self.log.fileno())
        self._apply(rec)
        return rec["index"]

    def handle(self, req):
        op, key, arg = req["op"], req.get("key"), req.get("input")
        with self.lock:
            current = self.data.get(key)
            if op == "get":
                return current
            if op == "put":
                return self._write(key, arg)
            if op == "cas":
                expected, value = arg
                ok = current is None if expected == 0 else current is not None and current[1] == expected
                if not ok:
                    return [False, 0 if current is None else current[1]]
                return [True, self._write(key, value)]
            if op == "rm":
                if current is None:
                    return False
                self._write(key, None)
                return True
            if op == "dump":
                return self.data
        raise ValueError(f"unknown op {op!r}")


def call(addr: tuple[str, int], req, timeout: float = 2.0):
    with socket.create_connection(addr, timeout=timeout) as s:
        s.sendall((json.dumps(req) + "\n").encode())
        line = s.makefile("rb").readline()
    if not line:
        raise ConnectionError("no answer")
    return json.loads(line)["output"]


def register(args) -> None:
    store = Register(args.file)
    primary = None
    if args.primary:
        ip, port = args.primary.rsplit(":", 1)
        primary = (ip, int(port))
        copy = {"data": {}}

        def refresh():
            while True:
                try:
                    copy["data"] = call(primary, {"op": "dump"})
                except OSError:
                    pass
                time.sleep(args.lag)

        threading.Thread(target=refresh, daemon=True).start()

    class Handler(socketserver.StreamRequestHandler):
        def handle(self):
            for line in self.rfile:
                req = json.loads(line)
                if primary is None:
                    out = store.handle(req)
                elif req["op"] == "get":
                    out = copy["data"].get(req["key"])  # stale: no coordination with the primary
                else:
                    out = call(primary, req)
                self.wfile.write((json.dumps({"output": out}) + "\n").encode())

    socketserver.ThreadingTCPServer.allow_reuse_address = True
    socketserver.ThreadingTCPServer.daemon_threads = True
    server = socketserver.ThreadingTCPServer((args.ip, args.port), Handler)
    sys.stdout.write(f"register on {args.ip}:{args.port} ({'replica of ' + args.primary if primary else 'primary'})\n")
    sys.stdout.flush()
    server.serve_forever()


def main() -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("serve")
    p.add_argument("ip")
    p.add_argument("port", type=int)
    p = sub.add_parser("tcp-echo")
    p.add_argument("ip")
    p.add_argument("port", type=int)
    p.add_argument("--timeout", type=float, default=1.0)
    p = sub.add_parser("udp-send")
    p.add_argument("ip")
    p.add_argument("port", type=int)
    p.add_argument("tag")
    p.add_argument("--count", type=int, default=5)
    p = sub.add_parser("register")
    p.add_argument("ip")
    p.add_argument("port", type=int)
    p.add_argument("file")
    p.add_argument("--primary")
    p.add_argument("--lag", type=float, default=0.5)
    args = parser.parse_args()
    if args.cmd == "serve":
        serve(args)
    elif args.cmd == "tcp-echo":
        return tcp_echo(args)
    elif args.cmd == "udp-send":
        return udp_send(args)
    else:
        register(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
