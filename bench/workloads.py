"""
Real client workloads, direct and through each source tree's proxy, side by
side (not a test: CI never runs it).

  git-clone   C{git clone} (protocol v2, full checkout into /dev/shm) of a
              ~200 MB repository of random (incompressible) files, served by
              git-http-backend behind nginx with Basic auth
              (tests/support/gitserver.py); the responses are chunked, so the
              proxy decodes and re-encodes every byte.  Direct: credentials in
              the URL.  Proxied: path mode, the .gitconfig
              C{connectors_proxy.clientconfig.gitconfig} writes (the client's
              token, a URL rewrite).
  pulls       10 C{skopeo copy docker://... dir:/dev/shm/...} at once of a
              ~250 MB image (five random layers), from a token-auth
              docker-registry (tests/support/registry.py).  Direct: the
              registry's user in the authfile.  Proxied: path mode, the
              client's token in the authfile (as clientconfig's docker
              config writes it).

For each: wall time (median over rounds; direct and trees interleaved), the
ratio to direct, and the proxy's CPU seconds per 100 MB relayed (user +
system time of the proxy process over the run / bytes).  Issue 15's targets:
10 parallel pulls within 1.15x of direct; git's CPU per 100 MB halved
(compare trees with --extra-proxy).

The repository and the image are generated once under
/tmp/connectors-proxy-bench/cache (a few minutes: umoci compresses 250 MB);
later runs reuse them.

    python bench/workloads.py                     # 3 rounds of each
    python bench/workloads.py --quick             # 1 round
    python bench/workloads.py --proxy-src /tmp/before --extra-proxy after=. --only pulls

Needs nginx, fcgiwrap, htpasswd, git, docker-registry, skopeo, umoci.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence

from harness import CACHE, Harness, cached_image, connector_manifests, image_bytes
from run import (
    NAMESPACE,
    ROOT,
    Background,
    MiB,
    Proc,
    cpu_seconds,
    need,
    run_main,
    source_trees,
    start_proxies,
    stop_all,
)

GIT_CONNECTOR, REGISTRY_CONNECTOR = "git", "registry"
GIT_REPO = "bench/big"
IMAGE_REPO, IMAGE_TAG = "bench/big", "v1"
SHM = "/dev/shm"


def git(argv: Sequence[str], env: dict[str, str], cwd: str | None = None, timeout: float = 900) -> str:
    result = subprocess.run(["git", *argv], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"git {' '.join(argv)} exited {result.returncode}: {result.stderr[-2000:]}")
    return result.stdout


def cached_repo(size_mb: int) -> tuple[str, int, str]:
    """
    A bare repository of about C{size_mb} MB of random files in a few
    commits, packed in one pack, built once under C{CACHE}; its path, the
    pack's size and the C{main} commit.
    """
    from tests.support.gitserver import git_env

    folder = os.path.join(CACHE, f"git-{size_mb}M")
    bare = os.path.join(folder, "big.git")
    described = os.path.join(folder, "repo.json")
    home = os.path.join(folder, "home")
    if os.path.exists(described):
        with open(described) as f:
            data = json.load(f)
        if os.path.isdir(bare):
            return bare, int(data["pack_bytes"]), str(data["head"])
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(home)
    with open(os.path.join(home, ".gitconfig"), "w") as f:
        f.write("[init]\n\tdefaultBranch = main\n")
    env = git_env(home)
    work = os.path.join(folder, "work")
    files = max(1, round(size_mb * 1e6 / MiB))
    print(f"generating a {size_mb} MB repository ({files} random files of 1 MiB, 4 commits) in {folder}"
          " (once) ...", flush=True)
    git(["init", "-q", "-b", "main", work], env)
    per_commit = -(-files // 4)
    for c in range(4):
        os.makedirs(os.path.join(work, f"part{c}"))
        for i in range(c * per_commit, min(files, (c + 1) * per_commit)):
            with open(os.path.join(work, f"part{c}", f"blob{i:04d}.bin"), "wb") as f:
                f.write(os.urandom(MiB))
        git(["add", "-A"], env, cwd=work)
        git(["commit", "-q", "-m", f"part {c}"], env, cwd=work)
    git(["clone", "-q", "--bare", "--no-local", work, bare], env)
    git(["-C", bare, "repack", "-a", "-d", "-q"], env)
    shutil.rmtree(work)
    pack_dir = os.path.join(bare, "objects", "pack")
    pack_bytes = sum(os.path.getsize(os.path.join(pack_dir, p)) for p in os.listdir(pack_dir) if p.endswith(".pack"))
    head = git(["-C", bare, "rev-parse", "main"], env).strip()
    with open(described, "w") as f:
        json.dump({"pack_bytes": pack_bytes, "head": head}, f)
    return bare, pack_bytes, head


def timed(argvs: list[list[str]], env: dict[str, str] | None, pids: list[int], timeout: float
          ) -> tuple[float, float, list[str], float]:
    """
    Run C{argvs} all at once; the wall time until the last ends, the CPU
    seconds C{pids} used meanwhile, the errors of those that failed, and
    the CPUs that processes outside the bench used meanwhile.
    """
    background = Background()
    cpu0, t0 = sum(cpu_seconds(p) for p in pids), time.monotonic()
    running = [subprocess.Popen(a, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
               for a in argvs]
    errors = []
    for p in running:
        _, err = p.communicate(timeout=timeout)
        if p.returncode != 0:
            errors.append(f"exit {p.returncode}: {err.strip()[-1500:]}")
    return time.monotonic() - t0, sum(cpu_seconds(p) for p in pids) - cpu0, errors, background.cpus()


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one round of each")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 3, quick 1)")
    parser.add_argument("--only", default="", help="comma-separated: git,pulls")
    parser.add_argument("--repo-mb", type=int, default=200, help="repository size (default 200 MB)")
    parser.add_argument("--layer-mb", type=int, default=50, help="image layer size (default 50 MB, 5 layers)")
    parser.add_argument("--pulls", type=int, default=10, help="parallel pulls (default 10)")
    parser.add_argument("--proxy-src", default=ROOT, help="source tree (default: this checkout)")
    parser.add_argument("--extra-proxy", action="append", default=[], metavar="NAME=DIR",
                        help="also run the tree DIR as NAME, side by side")
    parser.add_argument("--workdir", default=os.path.join("/tmp", "connectors-proxy-bench"))
    args = parser.parse_args(argv)
    for program in ("nginx", "fcgiwrap", "htpasswd", "git", "docker-registry", "skopeo", "umoci"):
        need(program)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    rounds = args.rounds or (1 if args.quick else 3)
    phases = set(filter(None, args.only.split(","))) or {"git", "pulls"}
    trees = source_trees(args.proxy_src, args.extra_proxy)

    run_dir = os.path.join(args.workdir, "workloads-" + time.strftime("%Y%m%d-%H%M%S"))
    scratch = os.path.join(SHM, f"connectors-proxy-workloads-{os.getpid()}")
    os.makedirs(scratch)
    print(f"connectors-proxy workloads {time.strftime('%Y-%m-%d %H:%M:%S %z')}: {rounds} round(s);"
          f" {os.cpu_count()} cpus, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    harness = Harness(os.path.join(run_dir, "fixtures"))
    procs: list[Proc] = []
    try:
        from connectors_proxy.clientconfig import docker_config, gitconfig
        from tests.support.gitserver import git_env, start_git_server
        from tests.support.registry import skopeo, start_token_registry, write_authfile

        token = "client-" + secrets.token_hex(16)
        objects, head = "", ""
        pack_bytes = pull_bytes = 0
        server = registry = None
        if "git" in phases:
            bare, pack_bytes, head = cached_repo(args.repo_mb)
            server = harness.call(start_git_server, harness)
            os.makedirs(os.path.join(server.root, os.path.dirname(GIT_REPO)), exist_ok=True)
            os.symlink(bare, server.bare_path(GIT_REPO))
            objects += connector_manifests(NAMESPACE, "git", GIT_CONNECTOR, server.base_url, server.username,
                                           server.password) + "---\n"
            print(f"repository: {pack_bytes / 1e6:.0f} MB pack, main at {head[:12]}", flush=True)
        if "pulls" in phases:
            os.environ.update(REGISTRY_LOG_ACCESSLOG_DISABLED="true", REGISTRY_LOG_LEVEL="warn")
            registry = harness.call(start_token_registry, harness)
            (reg_user, reg_password), = registry.users.items()
            image = cached_image(harness, f"{5 * args.layer_mb}M", (args.layer_mb * 1_000_000,) * 5)
            pull_bytes = image_bytes(image)
            registry_auth = write_authfile(os.path.join(run_dir, "registry-auth.json"),
                                           {registry.host: (reg_user, reg_password)})
            pushed = subprocess.run(skopeo("copy", "--dest-tls-verify=false", image.reference,
                                           f"docker://{registry.host}/{IMAGE_REPO}:{IMAGE_TAG}",
                                           authfile=registry_auth), capture_output=True, text=True, timeout=600)
            if pushed.returncode != 0:
                raise RuntimeError(f"pushing the image failed: {pushed.stderr}")
            objects += connector_manifests(NAMESPACE, "oci", REGISTRY_CONNECTOR, registry.address, reg_user,
                                           reg_password)
            print(f"image: {pull_bytes / 1e6:.0f} MB ({len(image.layer_sizes)} layers), pushed", flush=True)

        proxies = start_proxies(trees, run_dir, objects, token, procs)

        results: dict[tuple[str, str], list[tuple[float, float]]] = {}

        def record(phase: str, who: str, wall: float, cpu: float, errors: list[str], others: float,
                   mb: float) -> None:
            if errors:
                raise RuntimeError(f"{phase} {who}: {len(errors)} failed: {errors[0]}")
            results.setdefault((phase, who), []).append((wall, cpu))
            per = f"  proxy CPU {cpu:6.2f} s = {cpu / (mb / 100):5.2f} s/100 MB" if who != "direct" else ""
            print(f"  {phase:<9} {who:<18} {wall:7.2f} s{per}  (others {others:.2f} cpus)", flush=True)

        if server is not None:
            homes: dict[str, dict[str, str]] = {}
            for who, port in [("direct", 0), *((name, port) for name, _, port in proxies)]:
                home = os.path.join(run_dir, f"home-{who}")
                os.makedirs(home)
                text = "[init]\n\tdefaultBranch = main\n[protocol]\n\tversion = 2\n"
                if port:
                    text += gitconfig(server.base_url,
                                      f"http://127.0.0.1:{port}/namespaces/{NAMESPACE}/connectors/{GIT_CONNECTOR}",
                                      token)
                with open(os.path.join(home, ".gitconfig"), "w") as f:
                    f.write(text)
                homes[who] = git_env(home)
            print(f"\n== git clone of {pack_bytes / 1e6:.0f} MB (chunked responses), {rounds} round(s)"
                  " after one untimed clone each", flush=True)
            for round_ in range(rounds + 1):
                for who, target in [("direct", None), *((name, proc) for name, proc, _ in proxies)]:
                    url = server.url_with_credentials(GIT_REPO) if target is None else server.url(GIT_REPO)
                    dest = os.path.join(scratch, "clone")
                    wall, cpu, errors, others = timed([["git", "clone", "-q", url, dest]], homes[who],
                                              [target.pid] if target else [], timeout=900)
                    if not errors and git(["-C", dest, "rev-parse", "HEAD"], homes[who]).strip() != head:
                        errors = ["the clone's HEAD is not the repository's"]
                    shutil.rmtree(dest, ignore_errors=True)
                    if round_ == 0:  # warm-up: caches, connections, the first token
                        if errors:
                            raise RuntimeError(f"git clone {who}: {errors[0]}")
                        continue
                    record("git-clone", who, wall, cpu, errors, others, pack_bytes / 1e6)

        if registry is not None:
            n = args.pulls
            auth = {"direct": registry_auth}
            refs = {"direct": f"docker://{registry.host}/{IMAGE_REPO}:{IMAGE_TAG}"}
            for name, _, port in proxies:
                path = os.path.join(run_dir, f"auth-{name}.json")
                with open(path, "w") as f:
                    f.write(docker_config([f"127.0.0.1:{port}"], token))
                auth[name] = path
                refs[name] = (f"docker://127.0.0.1:{port}/namespaces/{NAMESPACE}/connectors/{REGISTRY_CONNECTOR}/"
                              f"{IMAGE_REPO}:{IMAGE_TAG}")
            print(f"\n== {n} parallel skopeo copy of {pull_bytes / 1e6:.0f} MB, {rounds} round(s)"
                  " after one untimed single pull each", flush=True)
            for round_ in range(rounds + 1):
                for who, target in [("direct", None), *((name, proc) for name, proc, _ in proxies)]:
                    dests = [os.path.join(scratch, f"pull-{i}") for i in range(n if round_ else 1)]
                    argvs = [skopeo("copy", "--src-tls-verify=false", refs[who], f"dir:{d}", authfile=auth[who])
                             for d in dests]
                    wall, cpu, errors, others = timed(argvs, None, [target.pid] if target else [], timeout=1200)
                    for d in dests:
                        if not errors and dir_bytes(d) < pull_bytes - 4096:
                            errors.append(f"{d} holds {dir_bytes(d)} bytes, fewer than the image's {pull_bytes}")
                        shutil.rmtree(d, ignore_errors=True)
                    if round_ == 0:  # warm-up: the registry's caches, the proxy's token and connections
                        if errors:
                            raise RuntimeError(f"skopeo copy {who}: {errors[0]}")
                        continue
                    record("pulls", who, wall, cpu, errors, others, n * pull_bytes / 1e6)

        print("\n== summary: medians over rounds")
        sizes = {"git-clone": pack_bytes / 1e6 if server else 0.0,
                 "pulls": args.pulls * pull_bytes / 1e6 if registry else 0.0}
        for phase in ("git-clone", "pulls"):
            direct = results.get((phase, "direct"))
            if not direct:
                continue
            direct_wall = statistics.median(w for w, _ in direct)
            print(f"  {phase:<9} {'direct':<18} {direct_wall:7.2f} s")
            for name, _, _ in proxies:
                runs = results.get((phase, name), [])
                if not runs:
                    continue
                wall = statistics.median(w for w, _ in runs)
                cpu_100 = statistics.median(c for _, c in runs) / (sizes[phase] / 100)
                ratio = wall / direct_wall
                verdict = f"  target <= 1.15x: {'met' if ratio <= 1.15 else 'missed'}" if phase == "pulls" else ""
                print(f"  {phase:<9} {name:<18} {wall:7.2f} s  {ratio:.2f}x direct{verdict};"
                      f" proxy CPU {cpu_100:.2f} s per 100 MB")
            first = proxies[0][0]
            for name, _, _ in proxies[1:]:
                a, b = results.get((phase, name)), results.get((phase, first))
                if a and b:
                    cpu_ratio = statistics.median(c for _, c in a) / statistics.median(c for _, c in b)
                    verdict = (f"  target <= 0.5x: {'met' if cpu_ratio <= 0.5 else 'missed'}"
                               if phase == "git-clone" else "")
                    print(f"  {phase:<9} {name} / {first} proxy CPU per 100 MB: {cpu_ratio:.2f}x{verdict}")
        print(f"\nload average now: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; logs in {run_dir}")
        return 0
    finally:
        stop_all(procs)
        harness.close()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    run_main(main)

