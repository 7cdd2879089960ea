"""
A real nginx REST upstream for tests, on a free loopback port:

- C{/basic/...}: files, behind HTTP Basic authentication (canary credentials);
  WebDAV C{PUT} stores uploads so a test can compare what arrived;
- C{/bearer/...}: the same files, behind a Bearer token (canary);
- C{/open/...}: the same files, anonymous;
- C{/basic/redirect-abs}, C{/basic/redirect-rel}: redirects back into C{/basic/};
- an access log of every request with the C{Authorization} header it carried,
  so a test can prove what the upstream saw (or that it saw nothing).

L{start_nginx_server} writes the part of nginx.conf every nginx fixture
shares (this one and the Git server's) and starts nginx.
"""

from __future__ import annotations

import base64
import os
import secrets
import time
from collections.abc import Mapping, Sequence

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from .procs import Server, free_port, require, start_server

_LOG_FIELDS = ("request_method", "request_uri", "status", "http_authorization", "http_x_forwarded_for",
               "http_x_forwarded_proto", "http_x_forwarded_host", "http_host", "request_length", "http_cookie",
               "body_bytes_sent")

# The top of every fixture's nginx.conf: one worker in the foreground, as
# root (the tests and CI run as root), with every file nginx writes under the
# fixture's directory, an access log of tab-separated fields, and request
# bodies of any size.  The fixture's own directives follow, inside C{http}.
_PREAMBLE = """\
user root;
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 512; }}
http {{
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    log_format tsv '{log_format}';
    access_log {tmp}/access.log tsv;
    client_max_body_size 0;
"""

_HTTP = """\
    keepalive_requests 100000;
    types {{ application/octet-stream bin; text/plain txt; application/json json; }}
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location /basic/ {{
            auth_basic "fixture";
            auth_basic_user_file {tmp}/htpasswd;
            dav_methods PUT DELETE;
            create_full_put_path on;
            location = /basic/redirect-abs {{ return 302 http://127.0.0.1:{port}/basic/small.txt; }}
            location = /basic/redirect-rel {{ absolute_redirect off; return 302 /basic/small.txt; }}
            location = /basic/echo {{
                default_type text/plain;
                return 200 "method=$request_method uri=$request_uri";
            }}
        }}
        location /bearer/ {{
            if ($http_authorization != "Bearer {bearer}") {{ return 401; }}
            location = /bearer/echo {{
                if ($http_authorization != "Bearer {bearer}") {{ return 401; }}
                default_type text/plain;
                return 200 "ok bearer";
            }}
        }}
        location /open/ {{
            dav_methods PUT;
            create_full_put_path on;
            location = /open/cookie {{
                add_header Set-Cookie "a=1";
                add_header Set-Cookie "b=2";
                add_header X-Multi one;
                add_header X-Multi two;
                default_type text/plain;
                return 200 "cookies";
            }}
        }}
    }}
"""


@frozen
class AccessEntry:
    method: str
    uri: str
    status: int
    authorization: str
    forwarded_for: str
    forwarded_proto: str
    forwarded_host: str
    host: str
    request_length: int
    cookie: str
    body_bytes_sent: int


@frozen
class Nginx:
    server: Server
    port: int
    root: str
    tmp: str
    username: str
    password: str
    bearer: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def basic_header(self) -> str:
        return "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode()

    def requests(self, at_least: int = 0) -> list[AccessEntry]:
        """
        What nginx logged.  nginx writes a line once the response is out, so
        a client can finish before it: wait (briefly) for C{at_least} lines.
        """
        deadline = time.monotonic() + 3
        while True:
            entries = self._read_log()
            if len(entries) >= at_least or time.monotonic() > deadline:
                return entries
            time.sleep(0.01)

    def last_request(self) -> AccessEntry:
        return self.requests(at_least=1)[-1]

    def _read_log(self) -> list[AccessEntry]:
        path = os.path.join(self.tmp, "access.log")
        if not os.path.exists(path):
            return []
        entries = []
        with open(path) as f:
            for line in f:
                fields = line.rstrip("\n").split("\t")
                fields = ["" if v == "-" else v for v in fields]
                entries.append(AccessEntry(fields[0], fields[1], int(fields[2]), fields[3], fields[4],
                                           fields[5], fields[6], fields[7], int(fields[8] or 0), fields[9],
                                           int(fields[10] or 0)))
        return entries

    def set_password(self, password: str) -> None:
        """Change the upstream's Basic password (nginx reads the file per request)."""
        with open(os.path.join(self.tmp, "htpasswd"), "w") as f:
            f.write(f"{self.username}:{_crypt_apr1(password)}\n")

    def write_file(self, relative: str, data: bytes) -> str:
        path = os.path.join(self.root, relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        return path


def _crypt_apr1(password: str) -> str:
    import subprocess
    out = subprocess.run([require("htpasswd"), "-nbm", "u", password], check=True, capture_output=True)
    return out.stdout.decode().strip().split(":", 1)[1]


def start_nginx_server(test: TestCase, tmp: str, port: int, log_fields: Sequence[str], http: str
                       ) -> Deferred[Server]:
    """
    Write C{tmp}/nginx.conf (the common preamble, then C{http}: the
    fixture's directives inside the C{http} block) and start nginx with it
    for C{test}, listening on C{port}; it logs each request to
    C{tmp}/access.log as the C{log_fields} nginx variables, tab-separated.
    """
    conf = os.path.join(tmp, "nginx.conf")
    with open(conf, "w") as f:
        f.write(_PREAMBLE.format(tmp=tmp, log_format="\\t".join("$" + name for name in log_fields)))
        f.write(http + "}\n")
    # -e: errors before nginx has read the configuration go there too, not
    # to the system's log.
    return start_server(test, [require("nginx"), "-c", conf, "-p", tmp, "-e", os.path.join(tmp, "error.log")],
                        port=port, name="nginx")


async def _start(test: TestCase, files: Mapping[str, bytes]) -> Nginx:
    tmp = os.path.abspath(test.mktemp())
    root = os.path.join(tmp, "www")
    for sub in ("basic", "bearer", "open"):
        os.makedirs(os.path.join(root, sub))
    port = free_port()
    username, password, bearer = "user-" + secrets.token_hex(4), secrets.token_hex(16), secrets.token_hex(20)
    os.makedirs(tmp, exist_ok=True)
    with open(os.path.join(tmp, "htpasswd"), "w") as f:
        f.write(f"{username}:{_crypt_apr1(password)}\n")
    nginx = Nginx(None, port, root, tmp, username, password, bearer)  # type: ignore[arg-type]
    for sub in ("basic", "bearer", "open"):
        nginx.write_file(f"{sub}/small.txt", b"hello from " + sub.encode() + b"\n")
        for name, data in files.items():
            nginx.write_file(f"{sub}/{name}", data)
    server = await start_nginx_server(test, tmp, port, _LOG_FIELDS,
                                      _HTTP.format(tmp=tmp, root=root, port=port, bearer=bearer))
    return Nginx(server, port, root, tmp, username, password, bearer)


def start_nginx(test: TestCase, files: Mapping[str, bytes] | None = None) -> Deferred[Nginx]:
    """Start the REST upstream with C{files} under each of C{/basic/}, C{/bearer/}, C{/open/}."""
    return Deferred.fromCoroutine(_start(test, files or {}))
