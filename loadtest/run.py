"""One command for a server load test: start `linrec serve` (the default model unless --model), run the
locust users headless for --run-time with --users, then print a table and write the summary JSON.

    linrec bench serve --users 8 --run-time 30s --out summary.json
    python -m linrec.loadtest.run --users 8 --run-time 30s --out summary.json    (the same)
    linrec bench serve --url http://host:8000 ...                                (an already running server)
    linrec bench serve --soak --run-time 10m --out soak.json                     (the soak: soak.py)

Locust runs in its own process (it monkey-patches the standard library with gevent); the users write
one JSON line per request, which summary.py turns into requests/s, output tokens/s, TTFT and
latency percentiles, and failures. The exit code is 1 when any request failed, 2 when the test could
not run (bad flags, no locust, the server or locust would not start).

--soak swaps locust for loadtest/soak.py: mixed traffic with deliberate disconnects and bad requests,
then checks that nothing was lost, that the state slots went back to zero and that RSS stayed flat.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

from linrec.loadtest.summary import format_table, summarize

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
DEFAULT_RUN_TIME = "20s"  # --run-time without --soak (the soak's is soak.DEFAULT_RUN_TIME)


class LoadTestError(RuntimeError):
    """The load test could not run; the message says why (with the server's or locust's log tail)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `linrec bench serve` and `python -m linrec.loadtest.run`."""
    server = parser.add_argument_group("server")
    server.add_argument("--model", default=None, metavar="DIR", help="model to serve (default: linrec's default)")
    server.add_argument("--url", default=None, help="load an already running server instead of starting one")
    server.add_argument("--port", type=int, default=0, help="port for the started server (default: a free one)")
    server.add_argument(
        "--server-arg",
        dest="server_args",
        action="append",
        default=[],
        metavar="FLAG",
        help="extra flag for `linrec serve`, e.g. --server-arg=--max-num-seqs=16 (repeatable)",
    )
    server.add_argument("--api-key", default=None, help="the server's API key (passed to the server it starts)")
    server.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for /health")
    load = parser.add_argument_group("load")
    load.add_argument("--users", type=int, default=8, help="concurrent users, each sending back to back")
    load.add_argument("--spawn-rate", type=float, default=None, help="users started per second (default: all at once)")
    load.add_argument("--run-time", default=None, help="run time, e.g. 30s, 2m (default: 20s; 10m with --soak)")
    load.add_argument(
        "--max-tokens", type=int, default=32, help="max_tokens of every request (--soak: longer ones draw 1x-4x it)"
    )
    load.add_argument("--allow-eos", action="store_true", help="let requests stop at EOS (default: exact lengths)")
    load.add_argument("--out", default=None, metavar="JSON", help="write the summary here")
    soak = parser.add_argument_group("soak (with --soak; loadtest/soak.py)")
    soak.add_argument(
        "--soak",
        action="store_true",
        help="instead of locust: mixed traffic with disconnects and bad requests, then check that nothing was "
        "lost, that the state slots went back to zero and that the server's RSS stayed flat (exit 1 if not)",
    )
    soak.add_argument("--seed", type=int, default=0, help="seed of the traffic mix")
    soak.add_argument("--disconnect-fraction", type=float, default=0.1, help="valid requests the client cuts off")
    soak.add_argument("--bad-fraction", type=float, default=0.1, help="requests that must get a 4xx")
    soak.add_argument("--skip-bad", default="", metavar="NAMES", help="bad kinds not to send, comma-separated")
    soak.add_argument("--request-timeout", type=float, default=120.0, help="seconds a request may take in all")
    soak.add_argument(
        "--settle-timeout", type=float, default=10.0, help="seconds for the slots to reach zero after the traffic"
    )
    soak.add_argument("--rss-interval", type=float, default=2.0, help="seconds between RSS samples")
    soak.add_argument(
        "--max-rss-growth",
        default="64MiB",
        help="RSS growth that fails the soak: MiB (64, 64MiB) or a percentage of the start (10%%); "
        "absolute by default because a leak is bytes per request, whatever the model's size",
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path: Path, num_chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-num_chars:] if path.exists() else "(no log)"


class StartedServer(NamedTuple):
    url: str
    command: list[str]
    pid: int  # the soak reads its RSS from /proc


@contextmanager
def started_server(args: argparse.Namespace, workdir: Path) -> Iterator[StartedServer]:
    """`linrec serve` in a subprocess until /health answers 200; SIGTERM (drain) on the way out."""
    port = args.port or free_port()
    command = [sys.executable, "-m", "linrec.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--log-level", "warning"]
    if args.model:
        command += ["--model", args.model]
    if args.api_key:
        command += ["--api-key", args.api_key]
    command += args.server_args
    log_path = workdir / "server.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + args.startup_timeout
        while True:
            if process.poll() is not None:
                raise LoadTestError(f"`linrec serve` exited with {process.returncode}:\n{_tail(log_path)}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, OSError):  # not listening yet, or not healthy yet
                pass
            if time.monotonic() > deadline:
                raise LoadTestError(f"`linrec serve` not healthy after {args.startup_timeout}s:\n{_tail(log_path)}")
            time.sleep(0.2)
        yield StartedServer(url, command, process.pid)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def served_model(url: str, api_key: str | None) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(f"{url}/v1/models", headers=headers), timeout=30) as r:
            return json.load(r)["data"][0]["id"]
    except urllib.error.HTTPError as exc:
        raise LoadTestError(f"expected 200 from {url}/v1/models, got {exc.code}: {exc.read()[:200]!r}") from None
    except urllib.error.URLError as exc:
        raise LoadTestError(f"expected a server at {url}, got {exc.reason}") from None


def run_locust(args: argparse.Namespace, url: str, model_name: str, workdir: Path) -> list[dict]:
    records_path, log_path = workdir / "records.jsonl", workdir / "locust.log"
    spawn_rate = args.spawn_rate if args.spawn_rate is not None else args.users
    command = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary"]
    command += ["--host", url, "--users", str(args.users), "--spawn-rate", str(spawn_rate)]
    command += ["--run-time", args.run_time or DEFAULT_RUN_TIME, "--stop-timeout", "120", "--loglevel", "WARNING"]
    command += ["--model-name", model_name, "--max-tokens", str(args.max_tokens), "--records", str(records_path)]
    if args.allow_eos:
        command.append("--allow-eos")
    if args.api_key:
        command += ["--api-key", args.api_key]
    with log_path.open("w") as log:
        # Exit code 1 means "some request failed", which the records show; anything else is locust failing.
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode
    if code not in (0, 1) or not records_path.exists():
        raise LoadTestError(f"locust exited with {code} and no records:\n{_tail(log_path)}")
    return [json.loads(line) for line in records_path.read_text().splitlines() if line]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}"


def run(args: argparse.Namespace) -> int:
    if args.soak:
        from linrec.loadtest.soak import run_soak  # httpx and prometheus_client: only when soaking

        return run_soak(args)
    if args.users < 1:
        raise LoadTestError(f"expected --users >= 1, got {args.users}")
    if args.max_tokens < 1:
        raise LoadTestError(f"expected --max-tokens >= 1, got {args.max_tokens}")
    if not LOCUSTFILE.exists():
        raise LoadTestError(f"expected the locustfile at {LOCUSTFILE}")
    # Looked up, not imported: importing locust monkey-patches this process with gevent.
    if importlib.util.find_spec("locust") is None:
        raise LoadTestError("expected locust to be installed: pip install 'linrec[loadtest]'")

    with tempfile.TemporaryDirectory(prefix="linrec-loadtest-") as tmp:
        workdir = Path(tmp)
        if args.url:
            url, server_command = args.url.rstrip("/").removesuffix("/v1"), None
            model_name = served_model(url, args.api_key)
            records = run_locust(args, url, model_name, workdir)
        else:
            with started_server(args, workdir) as (url, server_command, _):
                model_name = served_model(url, args.api_key)
                records = run_locust(args, url, model_name, workdir)
    config = {
        "users": args.users,
        "spawn_rate": args.spawn_rate if args.spawn_rate is not None else args.users,
        "run_time": args.run_time or DEFAULT_RUN_TIME,
        "max_tokens": args.max_tokens,
        "ignore_eos": not args.allow_eos,
        "model_name": model_name,
        "url": url,
        "server_command": server_command,
        "machine": machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "locust_version": _locust_version(),
    }
    summary = summarize(records, config)
    print(format_table(summary))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
        print(f"summary written to {args.out}")
    return 1 if summary["num_failures"] else 0


def _locust_version() -> str:
    from importlib.metadata import version

    return version("locust")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m linrec.loadtest.run", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except LoadTestError as exc:
        print(f"loadtest: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
