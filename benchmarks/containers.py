"""The reference deployment in containers against the same workers on the host, in turns within one run.

Both deployments serve the embedded SmolLM2 split into 4 partitions and stay up side by side; each round offers
the same load to one and then the other (the order rotates): ``batch`` concurrent greedy completions of
``--new-tokens`` tokens (``ignore_eos``) over the OpenAI API. Ratios (containers / host) are taken within a round;
their median is reported.

- containers: ``launch/docker-run.sh`` (the compose file's services: a coordinator and workers 0-3 on a private
  network, HTTP published on loopback), from an image built by ``launch/docker-run.sh build`` (``--build``);
- host: ``chatloop-serve cluster.launch=external`` and four ``chatloop-worker --config worker-config-N.yaml``
  processes, the same commands the containers run.

    python -m benchmarks.containers --rounds 3 --batches 1,8 --new-tokens 64
    python -m benchmarks.containers --build --docker "podman --runtime runc" --json containers.json

Needs podman (``launch/container-base.sh`` installs it, as root) or docker.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "launch" / "docker-run.sh"
BIN = Path(sys.executable).parent
PROMPT = "Write a long story about a lighthouse keeper and the sea."

__all__ = ["ContainerDeployment", "HostDeployment", "offer_load", "main"]


def _wait_healthy(url: str, timeout: float, alive=lambda: True) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"the deployment behind {url} exited while starting")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url}/health did not answer 200 within {timeout:.0f} s")


def _stages(url: str) -> list[dict]:
    """What each stage reports about where it runs (GET /v1/status)."""
    nodes = httpx.get(f"{url}/v1/status", timeout=10).json()["nodes"]
    keep = ("name", "host", "machine", "cores", "threads", "cpu_limit")
    return [{k: n.get(k) for k in keep if k in n} for n in nodes if n["role"] != "coordinator"]


class ContainerDeployment:
    """A coordinator and four worker containers started with ``launch/docker-run.sh``."""

    label = "containers"

    def __init__(self, docker: str, image: str, http_port: int, metrics_port: int, prefix: str = "chatloop-bench"):
        self.env = {**os.environ, "DOCKER": docker, "IMAGE": image, "PREFIX": prefix, "NETWORK": prefix,
                    "HTTP_PORT": str(http_port), "METRICS_PORT": str(metrics_port)}
        self.docker, self.prefix = shlex.split(docker), prefix
        self.url = f"http://127.0.0.1:{http_port}"

    def _run(self, *verb: str, timeout: float = 120) -> str:
        done = subprocess.run(["bash", str(RUN), *verb], env=self.env, capture_output=True, text=True, timeout=timeout)
        if done.returncode:
            raise RuntimeError(f"docker-run.sh {' '.join(verb)} failed: {done.stderr.strip()[-2000:]}")
        return done.stdout

    def build(self, build_args: str) -> None:
        self.env["BUILD_ARGS"] = build_args
        self._run("build", timeout=3600)

    def start(self, timeout: float = 300) -> None:
        self._run("stop")
        self._run("run-coordinator")
        for n in range(4):
            self._run("run-worker", str(n))
        _wait_healthy(self.url, timeout)

    def stop(self) -> None:
        self._run("stop")
        subprocess.run([*self.docker, "network", "rm", "-f", self.prefix], capture_output=True)


class HostDeployment:
    """The same coordinator and worker commands as the containers run, as processes on this host."""

    label = "host"

    def __init__(self, split: Path, http_port: int, master_port: int, workdir: Path):
        self.split, self.workdir, self.url = split, workdir, f"http://127.0.0.1:{http_port}"
        self.http_port, self.master_port = http_port, master_port
        self.procs: list[subprocess.Popen] = []

    def _spawn(self, cmd: list[str], log: str) -> None:
        out = (self.workdir / log).open("w")
        self.procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))

    def start(self, timeout: float = 300) -> None:
        from chatloop.network import free_port

        self._spawn([str(BIN / "chatloop-serve"), "cluster.launch=external", "cluster.num_workers=4",
                     f"model.partitions_dir={self.split}", f"cluster.master_port={self.master_port}",
                     f"server.port={self.http_port}", f"hydra.run.dir={self.workdir / 'run'}"], "coordinator.log")
        for n in range(4):
            raw = yaml.safe_load((self.split / "configs" / f"worker-config-{n}.yaml").read_text())
            raw.update(port=free_port(), metrics_port=free_port())
            config = self.workdir / f"worker-config-{n}.yaml"
            config.write_text(yaml.safe_dump(raw))
            self._spawn([str(BIN / "chatloop-worker"), "--config", str(config), "--coordinator",
                         f"127.0.0.1:{self.master_port}", "--partitions-dir", str(self.split)], f"worker{n}.log")
        _wait_healthy(self.url, timeout, alive=lambda: all(p.poll() is None for p in self.procs))

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def offer_load(url: str, batch: int, new_tokens: int) -> float:
    """``batch`` concurrent greedy completions of ``new_tokens`` tokens; generated tokens per second of wall time."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key=os.environ.get("CHATLOOP_API_KEY", "unused"), timeout=600,
                    max_retries=0)

    def one(k: int) -> int:
        answer = client.completions.create(model=client.models.list().data[0].id, prompt=f"{PROMPT} ({k})",
                                           max_tokens=new_tokens, temperature=0, extra_body={"ignore_eos": True})
        return answer.usage.completion_tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(batch) as pool:
        tokens = sum(pool.map(one, range(batch)))
    return tokens / (time.perf_counter() - start)


def measure(deployments: list, batches: list[int], rounds: int, new_tokens: int) -> dict:
    """Tokens/s of each deployment at each batch, round after round, and the within-round ratios."""
    for d in deployments:
        offer_load(d.url, 2, 8)  # warm-up: kernels built, first steps taken
    rows: dict[int, dict[str, list[float]]] = {b: {d.label: [] for d in deployments} for b in batches}
    for r in range(rounds):
        for batch in batches:
            order = deployments if r % 2 == 0 else deployments[::-1]
            for d in order:
                rows[batch][d.label].append(offer_load(d.url, batch, new_tokens))
            print(f"round {r + 1} batch {batch}: " + ", ".join(
                f"{d.label} {rows[batch][d.label][-1]:.1f} tok/s" for d in deployments), flush=True)
    summary = {}
    for batch, by_label in rows.items():
        ratios = [c / h for c, h in zip(by_label["containers"], by_label["host"])]
        summary[batch] = {"tokens_per_s": {k: statistics.median(v) for k, v in by_label.items()},
                          "rounds": by_label, "ratio": statistics.median(ratios), "ratio_range": [min(ratios),
                                                                                                  max(ratios)]}
    return summary


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", default="1,8", help="concurrent requests, comma-separated")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--docker", default=os.environ.get("DOCKER", "podman --runtime runc"))
    parser.add_argument("--image", default="localhost/chatloop-all-in-one:bench")
    parser.add_argument("--build", action="store_true", help="build the image first (launch/docker-run.sh build)")
    parser.add_argument("--base", default="localhost/debian-py:bookworm", help="base image for --build")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    ns = parser.parse_args(argv)

    from chatloop.network import free_port
    from chatloop.partition import split_model

    from .measure import host_info

    work = Path(tempfile.mkdtemp(prefix="chatloop-containers-"))
    containers = ContainerDeployment(ns.docker, ns.image, free_port(), free_port())
    if ns.build:
        pip = subprocess.run([sys.executable, str(ROOT / "launch" / "pip_build_args.py")], capture_output=True,
                             text=True, check=True).stdout.strip()
        containers.build(f"{pip} --build-arg BASE={ns.base}")
    split_model("smollm2", work / "split", 4, progress=False)
    host = HostDeployment(work / "split", free_port(), free_port(), work)
    deployments = [containers, host]
    try:
        for d in deployments:
            d.start()
        where = {d.label: _stages(d.url) for d in deployments}
        summary = measure(deployments, [int(b) for b in ns.batches.split(",")], ns.rounds, ns.new_tokens)
    finally:
        for d in deployments:
            d.stop()
    print(f"\n{'batch':>5}  {'containers tok/s':>16}  {'host tok/s':>10}  containers / host (range)")
    for batch, s in summary.items():
        lo, hi = s["ratio_range"]
        print(f"{batch:>5}  {s['tokens_per_s']['containers']:>16.1f}  {s['tokens_per_s']['host']:>10.1f}  "
              f"{s['ratio']:.2f} ({lo:.2f}-{hi:.2f})")
    result = {"host": host_info(), "args": vars(ns) | {"json": str(ns.json)}, "stages": where, "batches": summary}
    if ns.json:
        ns.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
