#!/usr/bin/env python3
"""The benchmark's physical limit: the least work a client can do to pull a whole mailbox.

LOGIN, SELECT INBOX, one `UID FETCH 1:* (BODY.PEEK[])`, LOGOUT. Every literal is read straight
from the socket in chunks of at most 1 MiB (recv_into one reused buffer) and discarded: no
parsing beyond finding the literal sizes, nothing stored, no flags changed (PEEK).

    raw_fetch.py --host localhost --port 993 --cafile cert.pem --user intake --password-file F
    raw_fetch.py --plain --port 143 ...

Prints one JSON line: {"literals": N, "literal_bytes": B, "tls": "...", "fetch_s": ..., "total_s": ...}.
Exits 1 with a message on stderr on any protocol error. Python standard library only.
"""
import argparse
import json
import re
import socket
import ssl
import sys
import time

CHUNK = 1 << 20
LITERAL_AT_END = re.compile(rb"\{(\d+)\}\r\n\Z")


class ImapError(Exception):
    pass


class Reader:
    """Line reads are buffered; literal bodies bypass the buffer and go into one 1 MiB array."""

    def __init__(self, sock):
        self.sock = sock
        self.pending = bytearray()          # bytes received but not consumed yet
        self.scratch = bytearray(CHUNK)
        self.view = memoryview(self.scratch)

    def _fill(self, limit=CHUNK):
        n = self.sock.recv_into(self.view[:limit])
        if n == 0:
            raise ImapError("server closed the connection")
        return n

    def line(self):
        while True:
            end = self.pending.find(b"\r\n")
            if end >= 0:
                out = bytes(self.pending[:end + 2])
                del self.pending[:end + 2]
                return out
            if len(self.pending) > 64 * CHUNK:
                raise ImapError("response line longer than 64 MiB")
            n = self._fill()
            self.pending += self.view[:n]

    def discard(self, size):
        """Consume `size` literal bytes without keeping them."""
        take = min(size, len(self.pending))
        del self.pending[:take]
        left = size - take
        while left:
            left -= self._fill(min(left, CHUNK))


def command(conn, reader, tag, text, on_literal=None):
    conn.sendall(tag + b" " + text + b"\r\n")
    while True:
        line = reader.line()
        # a response line may carry several literals: "... {n}\r\n<n bytes> ... {m}\r\n<m bytes>)"
        while True:
            m = LITERAL_AT_END.search(line)
            if not m:
                break
            size = int(m.group(1))
            if on_literal:
                on_literal(size)
            reader.discard(size)
            line = reader.line()
        if line.startswith(tag + b" "):
            if not line[len(tag) + 1:].startswith(b"OK"):
                raise ImapError(f"{text.split(b' ')[0].decode()} failed: {line.decode(errors='replace').strip()}")
            return


def quoted(s):
    return b'"' + s.replace("\\", "\\\\").replace('"', '\\"').encode("utf-8") + b'"'


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="localhost")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--plain", action="store_true", help="no TLS (default: implicit TLS)")
    ap.add_argument("--cafile", help="PEM file of the CA (or self-signed certificate) to trust")
    ap.add_argument("--user", default="intake")
    ap.add_argument("--password-file", required=True)
    ap.add_argument("--mailbox", default="INBOX")
    a = ap.parse_args()
    with open(a.password_file) as f:
        password = f.read().strip()

    t0 = time.monotonic()
    sock = socket.create_connection((a.host, a.port), timeout=300)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    tls = None
    if not a.plain:
        ctx = ssl.create_default_context(cafile=a.cafile)
        sock = ctx.wrap_socket(sock, server_hostname=a.host)
        tls = f"{sock.version()} {sock.cipher()[0]}"
    reader = Reader(sock)
    greeting = reader.line()
    if not greeting.startswith(b"* OK"):
        raise ImapError(f"unexpected greeting: {greeting!r}")
    command(sock, reader, b"A1", b"LOGIN " + quoted(a.user) + b" " + quoted(password))
    command(sock, reader, b"A2", b"SELECT " + quoted(a.mailbox))
    got = {"literals": 0, "literal_bytes": 0}

    def on_literal(size):
        got["literals"] += 1
        got["literal_bytes"] += size

    t1 = time.monotonic()
    command(sock, reader, b"A3", b"UID FETCH 1:* (BODY.PEEK[])", on_literal)
    t2 = time.monotonic()
    command(sock, reader, b"A4", b"LOGOUT")
    sock.close()
    got.update(tls=tls, fetch_s=round(t2 - t1, 3), total_s=round(time.monotonic() - t0, 3))
    print(json.dumps(got))


if __name__ == "__main__":
    try:
        main()
    except (ImapError, OSError) as e:
        print(f"raw_fetch: {e}", file=sys.stderr)
        sys.exit(1)
