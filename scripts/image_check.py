#!/usr/bin/env python3
"""Runs the built serving image the way a container runtime would, and checks it
from outside: health SERVING, Add + Search + ScorePairs answer correctly, SIGTERM
drains and exits 0, the data directory survives a restart, and (restarted with
SIMSERVE_VERIFY=1) a new collection's search is verified geometrically.

    scripts/build-image.sh                        # builds localhost/simserve:latest
    .venv/bin/python scripts/image_check.py [--image simserve:latest] [--out docs/bench/image.json]

There is no Docker engine here, so the container is a buildah working container
run with chroot isolation (host network), started with the image's own
ENTRYPOINT and environment. One difference from Docker, worked around: buildah
lets the image's ``VOLUME /data`` shadow a bind mount at /data, so the host
data folder is mounted at /srv/simserve-data and the server pointed there with
SIMSERVE_DATA_DIR (every server option is an environment variable).

Prints one JSON object: image size, cold start to SERVING (default model,
empty collection), restart to SERVING, and what was checked.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from simserve.client import Client  # noqa: E402

ENV = {**os.environ, "STORAGE_DRIVER": "vfs", "BUILDAH_ISOLATION": "chroot"}
DATA_IN_CONTAINER = "/srv/simserve-data"
UID = 10001  # the image's non-root user


def buildah(*args: str) -> str:
    return subprocess.run(["buildah", *args], env=ENV, check=True, capture_output=True, text=True).stdout.strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout.split()
    children: dict[int, list[int]] = {}
    for p, pp in zip(out[::2], out[1::2]):
        children.setdefault(int(pp), []).append(int(p))
    todo, found = [pid], []
    while todo:
        for c in children.get(todo.pop(), []):
            found.append(c)
            todo.append(c)
    return found


class Container:
    """One run of the image: started with its ENTRYPOINT, stopped like `docker stop`."""

    def __init__(self, ctr: str, entrypoint: list[str], data: Path, port: int, log: Path, env: tuple[str, ...] = ()) -> None:
        self.port, self.log = port, log
        extra = [a for e in env for a in ("-e", e)]
        cmd = ["buildah", "run", "--isolation", "chroot", "-v", f"{data}:{DATA_IN_CONTAINER}",
               "-e", f"SIMSERVE_DATA_DIR={DATA_IN_CONTAINER}", "-e", f"SIMSERVE_PORT={port}",
               "-e", f"SIMSERVE_METRICS_PORT={free_port()}", *extra, ctr, "--", *entrypoint]  # fmt: skip
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, env=ENV, stdout=log.open("ab"), stderr=subprocess.STDOUT)

    def wait_serving(self, timeout: float = 120.0) -> float:
        with Client(f"127.0.0.1:{self.port}", timeout=2, retries=0) as c:
            while time.monotonic() - self.t0 < timeout:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"container exited with {self.proc.returncode}; log: {self.log}")
                try:
                    if c.health_status() == "SERVING":
                        return time.monotonic() - self.t0
                except Exception:
                    pass
                time.sleep(0.1)
        raise TimeoutError(f"not SERVING after {timeout} s; log: {self.log}")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM to the container's main process (what `docker stop` does to PID 1)."""
        servers = [p for p in descendants(self.proc.pid) if b"simserve" in Path(f"/proc/{p}/cmdline").read_bytes()
                   and b"buildah" not in Path(f"/proc/{p}/cmdline").read_bytes()]  # fmt: skip
        if not servers:
            raise RuntimeError("server process not found in the container")
        os.kill(servers[-1], signal.SIGTERM)
        return self.proc.wait(timeout)


def check(image: str, workdir: Path) -> dict:
    examples = ROOT / "examples"
    size_line = buildah("images", "--format", "{{.Size}}", image)
    config = json.loads(buildah("inspect", "--type", "image", image))["Docker"]["config"]
    entrypoint = (config.get("Entrypoint") or []) + (config.get("Cmd") or [])
    ctr = buildah("from", "--name", f"simserve-check-{os.getpid()}", image)
    torch = buildah("run", ctr, "--", "python3", "-c", "import importlib.util as u; print(u.find_spec('torch') is not None)")
    data = workdir / "data"
    data.mkdir()
    os.chown(data, UID, UID)
    log = workdir / "container.log"
    result: dict = {"image": image, "size": size_line, "user": config.get("User"),
                    "entrypoint": entrypoint, "torch_installed": torch == "True", "healthcheck": config.get("Healthcheck", {}).get("Test")}  # fmt: skip
    try:
        port = free_port()
        run = Container(ctr, entrypoint, data, port, log)
        result["cold_start_s"] = round(run.wait_serving(), 2)
        probe = subprocess.run(["buildah", "run", "-e", f"SIMSERVE_PORT={port}", ctr, "--", *result["healthcheck"][1:]],
                               env=ENV, capture_output=True, text=True)  # fmt: skip
        result["healthcheck_output"] = (probe.stdout.strip() or probe.stderr.strip()[-300:], probe.returncode)
        with Client(f"127.0.0.1:{port}", timeout=30) as c:
            added = c.add({p.stem: p for p in sorted(examples.glob("*.png"))})
            hits = c.search(examples / "seagull-copy.jpg", k=2)
            same, diff = c.score([(examples / "seagull.png", examples / "seagull-copy.jpg"),
                                  (examples / "seagull.png", examples / "bee.png")])  # fmt: skip
        result["added"] = added
        result["search_top"] = hits[0]["key"]
        result["scores"] = {"copy": round(same.score, 4), "different": round(diff.score, 4)}
        result["sigterm_exit_code"] = run.stop()
        # Restarted with geometric verification asked for explicitly (the default too; the image
        # ships OpenCV): the old collection keeps its settings, a new one verifies.
        run = Container(ctr, entrypoint, data, port, log, env=("SIMSERVE_VERIFY=1",))
        result["restart_s"] = round(run.wait_serving(), 2)
        with Client(f"127.0.0.1:{port}", timeout=30) as c:
            result["items_after_restart"] = int(c.stats().items)
            result["search_top_after_restart"] = c.search(examples / "seagull-copy.jpg", k=1)[0]["key"]
            c.add({p.stem: p for p in sorted(examples.glob("*.png"))}, collection="verified")
            top = c.search(examples / "seagull-copy.jpg", k=1, collection="verified")[0]
            result["verified_search_top"] = (top["key"], top["inliers"])
        result["sigterm_exit_code_2"] = run.stop()
        result["ok"] = (
            not result["torch_installed"] and result["healthcheck_output"] == ("SERVING", 0) and result["search_top"] == "seagull" and same.score > diff.score and result["sigterm_exit_code"] == 0
            and result["items_after_restart"] == added and result["search_top_after_restart"] == "seagull"
            and result["verified_search_top"][0] == "seagull" and result["verified_search_top"][1] is not None
            and result["sigterm_exit_code_2"] == 0
        )  # fmt: skip
    finally:
        subprocess.run(["buildah", "rm", ctr], env=ENV, capture_output=True)
    result["log_tail"] = log.read_text(errors="replace").splitlines()[-3:]
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", default="localhost/simserve:latest")
    ap.add_argument("--out", help="also write the JSON here (docs/bench/image.json)")
    args = ap.parse_args(argv)
    if shutil.which("buildah") is None:
        print("buildah not found: run scripts/build-image.sh first", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="simserve-image-") as tmp:
        result = check(args.image, Path(tmp))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
