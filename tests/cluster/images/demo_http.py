"""demo-http: the stand-in for the quickstart's tomcat:9 image (it is NOT Tomcat).

Serves files under /usr/local/tomcat/webapps/ROOT on port 8080 with HTTP/1.1 keep-alive, so that the
quickstart's `mkdir webapps/ROOT; echo ... > webapps/ROOT/index.html` makes `/` answer with that file.
Anything missing is a 404, as it is before ROOT exists.
"""

import mimetypes
import os
import posixpath
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

DOCROOT = os.environ.get("DEMO_HTTP_ROOT", "/usr/local/tomcat/webapps/ROOT")
PORT = int(os.environ.get("DEMO_HTTP_PORT", "8080"))


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "demo-http/1"

    def _resolve(self):
        path = posixpath.normpath(unquote(urlsplit(self.path).path))
        parts = [p for p in path.split("/") if p not in ("", ".", "..")]
        full = os.path.join(DOCROOT, *parts)
        if os.path.isdir(full):
            full = os.path.join(full, "index.html")
        return full if os.path.isfile(full) else None

    def _respond(self, with_body):
        full = self._resolve()
        if full is None:
            body = b"404 Not Found\n"
            ctype = "text/plain; charset=utf-8"
            self.send_response(404)
        else:
            with open(full, "rb") as f:
                body = f.read()
            ctype = mimetypes.guess_type(full)[0] or "application/octet-stream"
            if ctype.startswith("text/"):
                ctype += "; charset=utf-8"
            self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if with_body:
            self.wfile.write(body)

    def do_GET(self):
        self._respond(True)

    def do_HEAD(self):
        self._respond(False)

    def log_message(self, fmt, *args):
        sys.stderr.write(f"demo-http {self.address_string()} {fmt % args}\n")


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def main():
    # As PID 1 Python gets no default SIGTERM action; without this every pod delete waits out its grace.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    srv = Server(("0.0.0.0", PORT), Handler)
    sys.stderr.write(f"demo-http: serving {DOCROOT} on :{PORT}\n")
    srv.serve_forever()


if __name__ == "__main__":
    main()
