# -*- test-case-name: tests.test_git_fixture -*-
"""
A real Git smart-HTTP server for tests: nginx in front of fcgiwrap running
git's own C{git-http-backend}, behind HTTP Basic authentication with random
canary credentials, on a free loopback port.

Optionally (C{lfs=True}) nginx also routes the Git LFS paths of every
repository (C{.../info/lfs/...}) to L{LFSResource}, a small LFS-style server
run in the test's reactor, so that one address serves Git and LFS the way
real Git hosts do.  The LFS server answers batch requests with C{href}s
pointing at its public (nginx) address and with an upstream-only
C{Authorization} header in each action, like GitHub or GitLab do; a proxy
must hide that header from its clients.

nginx writes an access log that tests read (L{GitServer.requests}) to prove
what the upstream saw: which requests arrived at all, with which
C{Authorization}, C{Git-Protocol} and C{Content-Encoding} headers.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from attrs import define, field, frozen
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from .nginx import start_nginx_server
from .procs import Server, check, free_port, require, run, start_server

GIT_HTTP_BACKEND = "/usr/lib/git-core/git-http-backend"

# One line per request; fields separated by tabs.  nginx escapes tabs and
# quotes inside values ("\x09"), so splitting on tabs is safe.
_LOG_FIELDS = (
    "remote_user", "request_method", "request_uri", "status", "http_authorization",
    "http_git_protocol", "http_content_encoding", "http_transfer_encoding",
    "http_content_length", "request_length", "http_x_forwarded_for", "http_host",
)

# Inside the http block (see L{start_nginx_server}).
_NGINX_HTTP = """\
    server {{
        listen 127.0.0.1:{port};
        server_name localhost;
        auth_basic "git fixture";
        auth_basic_user_file {htpasswd};
{lfs_location}
        location / {{
            include /etc/nginx/fastcgi_params;
            fastcgi_pass unix:{socket};
            fastcgi_param SCRIPT_FILENAME {backend};
            fastcgi_param GIT_PROJECT_ROOT {root};
            fastcgi_param GIT_HTTP_EXPORT_ALL "";
            fastcgi_param PATH_INFO $uri;
            fastcgi_param REMOTE_USER $remote_user;
            # git-http-backend streams its answers: let nginx pass them on as they come.
            fastcgi_buffering off;
        }}
    }}
"""

_LFS_LOCATION = """\
        location ~ ^/.+/info/lfs/ {{
            proxy_pass http://127.0.0.1:{lfs_port};
            proxy_set_header Host $http_host;
            proxy_http_version 1.1;
        }}
"""

# Refuses pushes to refs/heads/protected with a message of its own, so a test
# can check that git shows the server hook's words to the user.
_PRE_RECEIVE = """\
#!/bin/sh
while read old new ref; do
    if [ "$ref" = "refs/heads/protected" ]; then
        echo "{marker}: pushes to protected are not allowed by the server hook" >&2
        exit 1
    fi
done
exit 0
"""


@frozen
class AccessEntry:
    """One request as nginx logged it (C{""} for an absent header)."""

    remote_user: str
    request_method: str
    request_uri: str
    status: int
    http_authorization: str
    http_git_protocol: str
    http_content_encoding: str
    http_transfer_encoding: str
    http_content_length: str
    request_length: int
    http_x_forwarded_for: str
    http_host: str


def parse_access_line(line: str) -> AccessEntry:
    values = [("" if v == "-" else v) for v in line.rstrip("\n").split("\t")]
    if len(values) != len(_LOG_FIELDS):
        raise ValueError(f"unexpected access log line: {line!r}")
    raw = dict(zip(_LOG_FIELDS, values, strict=True))
    return AccessEntry(**{  # type: ignore[arg-type]
        **raw, "status": int(raw["status"]), "request_length": int(raw["request_length"] or 0),
    })


def git_env(home: str) -> dict[str, str]:
    """
    An environment in which C{git} reads only C{home}/.gitconfig: no system
    or user configuration of this machine, no prompts, no credential helper.
    """
    return {
        "HOME": home,
        "XDG_CONFIG_HOME": os.path.join(home, ".config"),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_ASKPASS": "",
        "SSH_ASKPASS": "",
        "GIT_AUTHOR_NAME": "Test Author",
        "GIT_AUTHOR_EMAIL": "author@example.com",
        "GIT_COMMITTER_NAME": "Test Author",
        "GIT_COMMITTER_EMAIL": "author@example.com",
        "LC_ALL": "C",
        "LANG": "C",
        # Only the proxy a test configures: none from this machine's environment.
        "http_proxy": "",
        "https_proxy": "",
        "all_proxy": "",
        "no_proxy": "",
    }


def fresh_home(test: TestCase) -> str:
    home = os.path.abspath(test.mktemp())
    os.makedirs(home)
    with open(os.path.join(home, ".gitconfig"), "w") as f:
        f.write("[init]\n\tdefaultBranch = main\n[protocol]\n\tversion = 2\n")
    return home


@define
class GitServer:
    """
    A running Basic-protected Git server.  C{base_url} has no trailing
    slash; repositories live at C{base_url/NAME.git}.
    """

    test: TestCase
    base_url: str
    port: int
    username: str
    password: str = field(repr=False)
    root: str
    access_log: str
    hook_marker: str
    nginx: Server
    fcgiwrap: Server
    lfs: LFSResource | None = None

    @property
    def authorization(self) -> str:
        """The C{Authorization} header value a direct client uses."""
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    def url(self, repo: str) -> str:
        return f"{self.base_url}/{repo}.git"

    def url_with_credentials(self, repo: str) -> str:
        """For clients that talk to the server directly (checks, not the proxy)."""
        return f"http://{self.username}:{self.password}@127.0.0.1:{self.port}/{repo}.git"

    def bare_path(self, repo: str) -> str:
        return os.path.join(self.root, repo + ".git")

    def requests(self) -> list[AccessEntry]:
        """Every request nginx has answered so far, oldest first."""
        with open(self.access_log) as f:
            return [parse_access_line(line) for line in f if line.strip()]

    async def create_repo(self, repo: str, files: dict[str, bytes] | None = None) -> str:
        """
        Create bare repository C{repo} (C{"app"}, or nested C{"team/app"})
        with receive-pack enabled, the protecting hook, and one commit on
        C{main} holding C{files} (default: a README).  Returns that commit.
        """
        bare = self.bare_path(repo)
        os.makedirs(os.path.dirname(bare), exist_ok=True)
        env = git_env(fresh_home(self.test))
        check(await run(["git", "init", "--quiet", "--bare", "-b", "main", bare], env=env))
        check(await run(["git", "-C", bare, "config", "http.receivepack", "true"], env=env))
        # Keep pushed packs as they come (index-pack) rather than exploding them
        # into loose objects: the same for git, much faster for big pushes.
        check(await run(["git", "-C", bare, "config", "receive.unpackLimit", "1"], env=env))
        hook = os.path.join(bare, "hooks", "pre-receive")
        with open(hook, "w") as f:
            f.write(_PRE_RECEIVE.format(marker=self.hook_marker))
        os.chmod(hook, 0o755)
        return await self.commit_upstream(repo, files or {"README.md": b"# fixture\n"}, "initial")

    async def commit_upstream(self, repo: str, files: dict[str, bytes], message: str,
                              branch: str = "main") -> str:
        """
        Change C{repo} on the server side (not over HTTP, so the access log
        does not see it): commit C{files} on C{branch}, return the commit id.
        """
        home = fresh_home(self.test)
        env = git_env(home)
        work = os.path.join(home, "work")
        bare = self.bare_path(repo)
        check(await run(["git", "init", "--quiet", "-b", branch, work], env=env))
        fetched = await run(["git", "-C", work, "fetch", "--quiet", bare, branch], env=env)
        if fetched.returncode == 0:
            check(await run(["git", "-C", work, "reset", "--quiet", "--hard", "FETCH_HEAD"], env=env))
        for name, content in files.items():
            path = os.path.join(work, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(content)
        check(await run(["git", "-C", work, "add", "-A"], env=env))
        check(await run(["git", "-C", work, "commit", "--quiet", "-m", message], env=env))
        # Straight into the bare repository: the receive hook is for HTTP pushes under test.
        check(await run(["git", "-C", work, "push", "--quiet", "--no-verify", bare,
                         f"HEAD:refs/heads/{branch}"], env=env))
        return await self.rev_parse(repo, branch)

    async def update_server_info(self, repo: str) -> None:
        """Write the files the dumb HTTP protocol reads (info/refs, objects/info/packs)."""
        check(await run(["git", "-C", self.bare_path(repo), "update-server-info"],
                        env=git_env(fresh_home(self.test))))

    async def rev_parse(self, repo: str, rev: str) -> str:
        result = check(await run(["git", "-C", self.bare_path(repo), "rev-parse", rev],
                                 env=git_env(fresh_home(self.test))))
        return result.stdout.decode().strip()


def start_git_server(test: TestCase, lfs: bool = False) -> Deferred[GitServer]:
    """
    Start nginx + fcgiwrap + git-http-backend for C{test} (stopped at its
    cleanup) with fresh random credentials; with C{lfs}, the LFS server too.
    """
    return Deferred.fromCoroutine(_start(test, lfs))


async def _start(test: TestCase, lfs: bool) -> GitServer:
    require("nginx")
    fcgiwrap_bin = require("fcgiwrap")
    htpasswd_bin = require("htpasswd")
    require("git")
    if not os.path.exists(GIT_HTTP_BACKEND):
        raise AssertionError(f"{GIT_HTTP_BACKEND} is missing: install the git package")

    tmp = os.path.abspath(test.mktemp())
    root = os.path.join(tmp, "repos")
    os.makedirs(root)
    username = "git-" + secrets.token_hex(4)
    password = "canary-" + secrets.token_hex(16)
    htpasswd = os.path.join(tmp, "htpasswd")
    # apr1 (htpasswd's default): nginx checks it through crypt(3) on every system.
    check(await run([htpasswd_bin, "-bc", htpasswd, username, password]))

    # Unix socket paths are limited to 108 bytes; trial's temp paths are longer.
    socket_dir = tempfile.mkdtemp(prefix="gitfcgi-")
    test.addCleanup(shutil.rmtree, socket_dir, True)
    socket_path = os.path.join(socket_dir, "fcgiwrap.sock")
    fcgiwrap = await start_server(test, [fcgiwrap_bin, "-f", "-c", "4", "-s", "unix:" + socket_path])
    deadline = time.monotonic() + 10
    while not os.path.exists(socket_path):
        if fcgiwrap.process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"fcgiwrap did not create {socket_path}:\n{fcgiwrap.log()[-3000:]}")
        await deferLater(_reactor, 0.02, lambda: None)

    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    lfs_resource = None
    lfs_location = ""
    if lfs:
        lfs_resource = LFSResource(public_url=base_url)
        site: Any = Site(lfs_resource)
        listening = _reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[attr-defined]
        test.addCleanup(listening.stopListening)
        lfs_location = _LFS_LOCATION.format(lfs_port=listening.getHost().port)  # type: ignore[attr-defined]

    access_log = os.path.join(tmp, "access.log")
    open(access_log, "w").close()
    nginx = await start_nginx_server(test, tmp, port, _LOG_FIELDS, _NGINX_HTTP.format(
        port=port, htpasswd=htpasswd, socket=socket_path, backend=GIT_HTTP_BACKEND, root=root,
        lfs_location=lfs_location,
    ))
    return GitServer(
        test=test, base_url=base_url, port=port, username=username, password=password, root=root,
        access_log=access_log, hook_marker="hook-" + secrets.token_hex(6), nginx=nginx,
        fcgiwrap=fcgiwrap, lfs=lfs_resource,
    )


# ---------------------------------------------------------------- Git LFS

LFS_JSON = "application/vnd.git-lfs+json"


@frozen
class LFSCall:
    """One request the LFS server answered, for tests to inspect."""

    method: str
    path: str
    authorization: str
    status: int


class LFSResource(Resource):
    """
    A small Git LFS server (batch API, basic transfer adapter, verify), kept
    in memory.  Authentication is nginx's job in front of it; what arrives
    here has passed Basic auth with the fixture's credentials.

    Each action carries C{header: {Authorization: RemoteAuth <token>}} with
    C{upstream_token}: an upstream-only credential that must never reach a
    proxied client.  C{objects} holds what was uploaded, C{calls} what was
    asked.
    """

    isLeaf = True

    def __init__(self, public_url: str) -> None:
        super().__init__()
        self.public_url = public_url
        self.upstream_token = "lfs-upstream-" + secrets.token_hex(12)
        self.objects: dict[str, bytes] = {}
        self.calls: list[LFSCall] = []

    def render(self, request: Request) -> bytes:  # type: ignore[override]
        path = request.path.decode()
        body = self._dispatch(request, path)
        self.calls.append(LFSCall(
            method=request.method.decode(), path=path,
            authorization=(request.getHeader("authorization") or ""), status=request.code,
        ))
        return body

    def _dispatch(self, request: Request, path: str) -> bytes:
        head, sep, rest = path.partition("/info/lfs/")
        if not sep:
            return _lfs_error(request, 404, "not an LFS path")
        repo = head.lstrip("/")
        if rest == "objects/batch" and request.method == b"POST":
            return self._batch(request, repo)
        if rest == "verify" and request.method == b"POST":
            return self._verify(request)
        if rest.startswith("objects/") and request.method in (b"GET", b"PUT"):
            return self._transfer(request, rest[len("objects/"):])
        return _lfs_error(request, 404, f"no LFS endpoint {rest}")

    def _batch(self, request: Request, repo: str) -> bytes:
        try:
            doc = json.loads(request.content.read())  # type: ignore[union-attr]
            operation = doc["operation"]
            wanted = [(str(o["oid"]), int(o["size"])) for o in doc["objects"]]
        except (ValueError, KeyError, TypeError):
            return _lfs_error(request, 422, "malformed batch request")
        header = {"Authorization": f"RemoteAuth {self.upstream_token}"}
        answers: list[dict[str, Any]] = []
        for oid, size in wanted:
            href = f"{self.public_url}/{repo}/info/lfs/objects/{oid}"
            entry: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if operation == "download":
                if oid not in self.objects:
                    entry["error"] = {"code": 404, "message": "object not found"}
                else:
                    entry["actions"] = {"download": {"href": href, "header": header, "expires_in": 3600}}
            elif oid not in self.objects:
                entry["actions"] = {
                    "upload": {"href": href, "header": header, "expires_in": 3600},
                    "verify": {"href": f"{self.public_url}/{repo}/info/lfs/verify",
                               "header": header, "expires_in": 3600},
                }
            answers.append(entry)
        request.setHeader("content-type", LFS_JSON)
        return json.dumps({"transfer": "basic", "objects": answers, "hash_algo": "sha256"}).encode()

    def _transfer(self, request: Request, oid: str) -> bytes:
        if request.method == b"GET":
            if oid not in self.objects:
                return _lfs_error(request, 404, "object not found")
            request.setHeader("content-type", "application/octet-stream")
            return self.objects[oid]
        data = request.content.read()  # type: ignore[union-attr]
        if hashlib.sha256(data).hexdigest() != oid:
            return _lfs_error(request, 422, "content does not match its oid")
        self.objects[oid] = data
        return b""

    def _verify(self, request: Request) -> bytes:
        doc = json.loads(request.content.read())  # type: ignore[union-attr]
        stored = self.objects.get(doc.get("oid"))
        if stored is None or len(stored) != doc.get("size"):
            return _lfs_error(request, 404, "object not stored")
        return b""


def _lfs_error(request: Request, code: int, message: str) -> bytes:
    request.setResponseCode(code)
    request.setHeader("content-type", LFS_JSON)
    return json.dumps({"message": message}).encode()


def lfs_pointer(data: bytes) -> tuple[str, int]:
    """The C{(oid, size)} by which LFS names C{data}."""
    return hashlib.sha256(data).hexdigest(), len(data)


def has_secret(haystacks: Sequence[bytes | str], secret: str) -> bool:
    """
    Whether C{secret} appears in any of C{haystacks}, raw or inside a Basic
    credential (base64 of C{user:secret} at any alignment).
    """
    needles = [secret.encode()]
    for prefix_len in range(3):
        chunk = base64.b64encode(b"x" * prefix_len + secret.encode())
        # Drop the characters that depend on neighbouring bytes.
        start = {0: 0, 1: 4, 2: 4}[prefix_len]
        needles.append(chunk[start:-4])
    for hay in haystacks:
        data = hay.encode() if isinstance(hay, str) else hay
        if any(n and n in data for n in needles):
            return True
    return False
