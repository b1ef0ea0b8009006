#!/usr/bin/env python3
"""An HTTP server for the importer's tests, on 127.0.0.1, serving files
from ROOT with the behaviour chosen by the first path segment:

  /plain/F        200 with Content-Length and Accept-Ranges; Range honoured
  /noranges/F     200 with Content-Length; no Accept-Ranges; Range ignored
  /chunked/F      200 with chunked transfer encoding, no Content-Length
  /cut/F          the first GET announces the whole length but the
                  connection closes after half; later requests as /plain
  /cutnoranges/F  as /cut, but no Range support at all
  /flaky/F        the first two GETs answer 503; later ones as /plain
  /redirect/F     302 to /plain/F
  /slow/F         as /plain, 64 KiB every 20 ms
  anything else   404

Usage: http_server.py ROOT. It prints the port it listens on, then serves
until killed.
"""

import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ROOT = sys.argv[1]
COUNTS = {}
LOCK = threading.Lock()


def count(key):
    with LOCK:
        COUNTS[key] = COUNTS.get(key, 0) + 1
        return COUNTS[key]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        parts = self.path.split("?")[0].lstrip("/").split("/", 1)
        if len(parts) != 2 or ".." in parts[1]:
            return self.status(404)
        mode, name = parts
        path = os.path.join(ROOT, name)
        if not os.path.isfile(path):
            return self.status(404)
        attempt = count(self.path)
        if mode == "redirect":
            self.send_response(302)
            self.send_header("Location", "/plain/" + name)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if mode == "flaky" and attempt <= 2:
            return self.status(503)
        size = os.path.getsize(path)
        ranges = mode in ("plain", "cut", "flaky", "slow")
        with open(path, "rb") as source:
            if mode == "chunked":
                self.send_response(200)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                while True:
                    block = source.read(300_000)
                    if not block:
                        break
                    self.wfile.write(b"%x\r\n" % len(block) + block + b"\r\n")
                self.wfile.write(b"0\r\n\r\n")
                return
            start, end = 0, size - 1
            header = self.headers.get("Range")
            if ranges and header and header.startswith("bytes="):
                first, _, last = header[6:].partition("-")
                start = int(first)
                if last:
                    end = min(int(last), size - 1)
                if start > end:
                    self.send_response(416)
                    self.send_header("Content-Range", "bytes */%d" % size)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", "bytes %d-%d/%d" % (start, end, size))
            else:
                self.send_response(200)
            if ranges:
                self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(end + 1 - start))
            self.end_headers()
            source.seek(start)
            limit = end + 1 - start
            if mode in ("cut", "cutnoranges") and attempt == 1:
                limit = (size - start) // 2
                self.close_connection = True
            sent = 0
            while sent < limit:
                block = source.read(min(65536, limit - sent))
                if not block:
                    break
                try:
                    self.wfile.write(block)
                except (BrokenPipeError, ConnectionResetError):
                    return
                sent += len(block)
                if mode == "slow":
                    time.sleep(0.02)
            if self.close_connection:
                self.wfile.flush()
                self.connection.shutdown(2)

    def status(self, code):
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
