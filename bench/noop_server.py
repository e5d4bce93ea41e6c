"""The ceiling: a stdlib ThreadingHTTPServer that reads the body and answers a fixed JSON.

It does the least any Python stdlib HTTP sink can do (keep-alive, Nagle off, one write per
response), so observerd's throughput is reported as a ratio to it, measured in the same run.
"""

from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

BODY = b'{"accepted": true}'
RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
            % len(BODY)) + BODY


class NoopHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.wfile.write(RESPONSE)

    do_GET = do_POST

    def log_message(self, *args):
        pass


class NoopServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024


if __name__ == "__main__":
    server = NoopServer(("127.0.0.1", 0), NoopHandler)
    print(f"listening port={server.server_address[1]}", flush=True)
    server.serve_forever()
