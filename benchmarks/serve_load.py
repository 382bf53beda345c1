"""Load test of ``POST /api/v1/segment`` on loopback: N concurrent clients for a fixed time.

Starts ``vocabseg serve`` itself (model flags after ``--``), warms it up, then runs each client count
for ``--seconds`` (and at most ``--max-requests`` requests), and reports requests/s, p50/p95 latency,
refusals (503, queue full), errors, the server's CPU use and peak memory (VmHWM), and the CPU used by
other processes meanwhile (on a shared machine, a run where that is high is not representative).
Stops by itself.

    python benchmarks/serve_load.py --clients 1 4 16 --seconds 30 -- --method sclip --model ViT-B-16 --pretrained none

Not a test: numbers depend on the machine; the committed table names the one it ran on.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from common import describe_device

DEFAULT_IMAGE = Path(__file__).resolve().parents[1] / "src" / "vocabseg" / "serve" / "examples" / "street.jpg"


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    refused: int = 0
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mb(pid: int) -> float | None:
    """The process's peak resident memory (Linux ``VmHWM``), in MiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux), to see whether other load stole the cores."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def busy_cpu_seconds() -> float:
    """CPU time spent by the whole machine (all processes) since boot, from /proc/stat."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return float("nan")
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def start_server(model_args: list[str], port: int, workers: int, queue_size: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    command = [sys.executable, "-m", "vocabseg", "serve", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--workers", str(workers), "--queue-size", str(queue_size), *model_args]
    process = subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited ({process.returncode}); see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.5)
    process.terminate()
    raise SystemExit(f"server did not start in 300 s; see {log}")


def run_clients(url: str, image: bytes, classes: str, clients: int, seconds: float, max_requests: int) -> Tally:
    tally = Tally()
    stop_at = time.monotonic() + seconds
    budget = threading.Semaphore(max_requests)

    def client() -> None:
        with httpx.Client(timeout=300) as session:
            while time.monotonic() < stop_at and budget.acquire(blocking=False):
                start = time.monotonic()
                try:
                    response = session.post(url, files={"image": ("image.jpg", image)}, data={"classes": classes})
                except httpx.HTTPError as exc:
                    with tally.lock:
                        tally.errors.append(type(exc).__name__)
                    continue
                elapsed = time.monotonic() - start
                with tally.lock:
                    if response.status_code == 200:
                        tally.latencies.append(elapsed)
                    elif response.status_code == 503:
                        tally.refused += 1
                    else:
                        tally.errors.append(str(response.status_code))
                if response.status_code == 503:  # honour Retry-After, but never past the end of the run
                    time.sleep(min(float(response.headers.get("retry-after", 1)), max(stop_at - time.monotonic(), 0)))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return tally


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="concurrent clients, one run each")
    parser.add_argument("--seconds", type=float, default=30.0, help="duration of each run")
    parser.add_argument("--max-requests", type=int, default=2000, help="cap on requests per run")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--queue-size", type=int, default=8)
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    parser.add_argument("--classes", default="car, road; street, building, sky, sidewalk")
    parser.add_argument("--label", default="", help="a name for this configuration in the table")
    parser.add_argument(
        "--log", type=Path, default=Path(tempfile.gettempdir()) / "vocabseg_serve_load.log", help="server output"
    )
    parser.add_argument("model_args", nargs=argparse.REMAINDER, help="-- then `vocabseg serve` model flags")
    args = parser.parse_args()
    model_args = args.model_args[1:] if args.model_args[:1] == ["--"] else args.model_args

    port = free_port()
    process = start_server(model_args, port, args.workers, args.queue_size, args.log)
    url = f"http://127.0.0.1:{port}/api/v1/segment"
    image = args.image.read_bytes()
    try:
        warm = httpx.post(url, files={"image": ("image.jpg", image)}, data={"classes": args.classes}, timeout=600)
        if warm.status_code != 200:
            raise SystemExit(f"warm-up request failed: {warm.status_code} {warm.text}")
        print(f"# {describe_device()}; server: {' '.join(model_args)}")
        print(
            "| config | clients | workers/queue | req/s | p50 s | p95 s | ok | 503 | errors "
            "| server CPU (cores) | other processes' CPU (cores) | server peak RSS MiB |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for clients in args.clients:
            start, cpu, busy, own = time.monotonic(), cpu_seconds(process.pid), busy_cpu_seconds(), time.process_time()
            tally = run_clients(url, image, args.classes, clients, args.seconds, args.max_requests)
            wall = time.monotonic() - start
            cores = (cpu_seconds(process.pid) - cpu) / wall
            clients_cpu = time.process_time() - own
            others = max(busy_cpu_seconds() - busy - cores * wall - clients_cpu, 0.0) / wall
            ok = len(tally.latencies)
            print(
                f"| {args.label} | {clients} | {args.workers}/{args.queue_size} | {ok / wall:.2f} "
                f"| {percentile(tally.latencies, 50):.3f} | {percentile(tally.latencies, 95):.3f} | {ok} "
                f"| {tally.refused} | {len(tally.errors)} | {cores:.2f} | {others:.2f} "
                f"| {peak_rss_mb(process.pid) or float('nan'):.0f} |",
                flush=True,
            )
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
