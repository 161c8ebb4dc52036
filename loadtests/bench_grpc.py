"""gRPC load test: rnnserve against an echo ceiling, its unbatched self and a real Triton.

    .venv/bin/python loadtests/bench_grpc.py \\
        [--peers echo unbatched memory memory-proc redis redis-x2 triton] \\
        [--modes step stream runseq kserve kserve-stream many] [--sessions 16 64 256 1024] \\
        [--model lstm256] [--duration 5] [--warmup 1.5] [--workers 2] [--update-docs]

Every peer is started by this script in the same run, measured on every (mode, sessions)
point it serves, then stopped, so the peers never compete with each other. The load
generator runs in `--workers` processes of its own (asyncio loops of ping-ponging
sessions, see `harness/load.py`). `triton` needs `bash loadtests/triton_peer/setup.sh`
first (a separate venv); `redis*` need a Redis at `--redis-url`.

Writes `<out>/bench_grpc.json`, `<out>/bench_grpc.md` and two PNG plots (throughput,
p50/p99 latency vs sessions); with `--update-docs` puts the table, plots and this exact
command into `docs/benchmarks.md` (between the `bench_grpc` markers). A live progress line
goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import queue
import random
import shlex
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtests.harness.load import MODES, Job, Result, worker_main
from loadtests.harness.peers import ROOT, Peer, build_peers
from loadtests.harness.report import summarize, write_outputs

PEERS = ("echo", "unbatched", "memory", "memory-proc", "redis", "redis-x2", "triton")


class Workers:
    """`count` load-generator processes, started once, given one point at a time."""

    def __init__(
        self, count: int, profile_dir: Path | None = None, profile_gil: bool = False
    ) -> None:
        self.profile_dir = profile_dir
        self.profile_gil = profile_gil
        ctx = mp.get_context("spawn")
        self.count = count
        self.jobs = [ctx.Queue() for _ in range(count)]
        self.results: Any = ctx.Queue()
        self.ready: Any = ctx.Queue()
        self.counters = [ctx.RawValue("q", 0) for _ in range(count)]
        self.start_value = ctx.RawValue("d", 0.0)
        self.go = ctx.Event()
        self.last_cpu: dict[str, float] = {}
        self.crashed = False
        self.processes = [
            ctx.Process(
                target=worker_main,
                args=(
                    self.jobs[i],
                    self.results,
                    self.counters[i],
                    self.ready,
                    self.start_value,
                    self.go,
                ),
                daemon=True,
            )
            for i in range(count)
        ]
        for process in self.processes:
            process.start()

    def _profile(
        self, peer: Peer, label: str, at: float, duration_s: float
    ) -> threading.Thread | None:
        """`--profile DIR`: py-spy samples the peer's first process over the measured
        window into DIR/<label>.txt (collapsed stacks, one per thread, idle included)."""
        if self.profile_dir is None or not peer.pids():
            return None
        target = peer.pids()[0]
        if peer.ready_count > 1:  # `--processes N`: profile the first server, not the supervisor
            target = min(_children(target), default=target)
        out = self.profile_dir / (label.replace(" ", "-") + ".txt")
        command = [
            str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(target),
            "--duration", str(max(1, round(duration_s))), "--rate", "250", "--format", "raw",
            "--threads", "--idle", "--nonblocking", "--output", str(out),
            *(["--gil"] if self.profile_gil else []),
        ]  # fmt: skip

        def record() -> None:
            time.sleep(max(0.0, at - time.time()))
            subprocess.run(command, check=False, capture_output=True)

        thread = threading.Thread(target=record, daemon=True)
        thread.start()
        return thread

    def run(self, jobs: list[Job], label: str, peer: Peer) -> list[Result]:
        self.go.clear()
        self.crashed = False
        while True:  # leftovers of a failed point
            try:
                self.ready.get_nowait()
            except queue.Empty:
                break
        for q, job in zip(self.jobs, jobs, strict=False):
            q.put(job)
        for _ in jobs:
            self.ready.get(timeout=300)
        metrics0 = peer.scrape()
        server_cpu0 = _cpu_seconds(peer.pids())
        client_cpu0 = _cpu_seconds([p.pid for p in self.processes if p.pid is not None])
        done0 = sum(c.value for c in self.counters)
        start_at = time.time() + 0.3
        self.start_value.value = start_at
        self.go.set()
        job = jobs[0]
        end = start_at + job.warmup_s + job.duration_s
        profiler = self._profile(peer, label, start_at + job.warmup_s, job.duration_s)
        last_t, last_n = time.time(), done0
        results: list[Result] = []
        while len(results) < len(jobs):
            try:
                results.append(self.results.get(timeout=0.5))
                continue
            except queue.Empty:
                pass
            now = time.time()
            done = sum(c.value for c in self.counters)
            rate = (done - last_n) / max(now - last_t, 1e-9)
            last_t, last_n = now, done
            phase = "warmup" if now < start_at + job.warmup_s else "measure"
            if now > end:
                phase = "draining"
            sys.stderr.write(
                f"\r  {label:<44} {phase:<8} {max(0.0, end - now):5.1f}s left "
                f"{rate:>9,.0f} steps/s  {done:>9,} steps  "
            )
            sys.stderr.flush()
            if not peer.alive() and not self.crashed:
                # Keep collecting: the workers finish their window against a dead port.
                self.crashed = True
                sys.stderr.write(f"\n  peer {peer.name} died:\n{peer.log_tail()[-1500:]}\n")
        sys.stderr.write("\r" + " " * 110 + "\r")
        if profiler is not None:
            profiler.join()
        # CPU per step over the whole point (warm-up included): what one step costs the
        # server and the load generator, however busy the machine is.
        steps = max(1, sum(c.value for c in self.counters) - done0)
        self.last_cpu = {
            "server_cpu_us_per_step": (_cpu_seconds(peer.pids()) - server_cpu0) / steps * 1e6,
            "client_cpu_us_per_step": (
                _cpu_seconds([p.pid for p in self.processes if p.pid is not None]) - client_cpu0
            )
            / steps
            * 1e6,
        }
        metrics1 = peer.scrape()
        delta = {k: v - metrics0.get(k, 0.0) for k, v in metrics1.items()}
        batches = delta.get("rnnserve_batch_size_steps_count", 0.0)
        if batches > 0:
            self.last_cpu["mean_batch"] = delta["rnnserve_batch_size_steps_sum"] / batches
            self.last_cpu["batches_per_s"] = batches / (time.time() - start_at)
            for name, key in (
                ("compute_ms_per_batch", "rnnserve_compute_duration_seconds"),
                ("state_load_ms_per_batch", "rnnserve_state_load_duration_seconds"),
                ("state_commit_ms_per_batch", "rnnserve_state_commit_duration_seconds"),
            ):
                count = delta.get(f"{key}_count", 0.0)
                if count > 0:
                    self.last_cpu[name] = delta[f"{key}_sum"] / count * 1e3
        return results

    def close(self) -> None:
        for q in self.jobs:
            q.put(None)
        for process in self.processes:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()


def _split(total: int, parts: int) -> list[tuple[int, int]]:
    """(count, first index) per worker."""
    base, extra = divmod(total, parts)
    out, first = [], 0
    for i in range(parts):
        n = base + (1 if i < extra else 0)
        out.append((n, first))
        first += n
    return out


def _children(pid: int) -> list[int]:
    """Direct children of `pid` (Linux /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except OSError:
                continue
    return out


def _cpu_seconds(roots: list[int]) -> float:
    """User + system CPU seconds of these processes and all their descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    times: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(entry)
        children.setdefault(int(fields[1]), []).append(pid)
        times[pid] = (int(fields[11]) + int(fields[12])) / tick
    total, todo, seen = 0.0, list(roots), set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += times.get(pid, 0.0)
        todo.extend(children.get(pid, []))
    return total


def _loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", nargs="+", default=list(PEERS))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--sessions", nargs="+", type=int, default=[16, 64, 256, 1024])
    parser.add_argument(
        "--model", default="lstm256", choices=("lstm256", "gru256", "stacked", "lstm1024")
    )
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per point")
    parser.add_argument("--warmup", type=float, default=1.5, help="unmeasured seconds first")
    parser.add_argument("--workers", type=int, default=2, help="load-generator processes")
    parser.add_argument("--chunk", type=int, default=16, help="steps per RunSequence call")
    parser.add_argument("--stream-width", type=int, default=64, help="sessions per stream")
    parser.add_argument(
        "--many-width", type=int, default=256, help="sessions per StepMany message (`many`)"
    )
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--repository", type=Path, default=ROOT / "build" / "bench-models")
    parser.add_argument("--triton-venv", type=Path, default=ROOT / ".venv-triton")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "bench_grpc")
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="py-spy each point's server (first process) over the measured window into DIR",
    )
    parser.add_argument(
        "--profile-gil",
        action="store_true",
        help="with --profile: sample only the thread holding the GIL (where the GIL goes)",
    )
    parser.add_argument(
        "--rnnserve-args",
        default="",
        help="extra `rnnserve serve` flags for every rnnserve peer (one string)",
    )
    parser.add_argument("--update-docs", action="store_true", help="write docs/benchmarks.md")
    parser.add_argument(
        "--render",
        type=Path,
        default=None,
        help="measure nothing: write the outputs again from a saved bench_grpc.json",
    )
    args = parser.parse_args()
    if args.render is not None:
        saved = json.loads(args.render.read_text())
        write_outputs(saved["meta"], saved["points"], args.out, update_docs=args.update_docs)
        return

    command = ".venv/bin/python loadtests/bench_grpc.py " + shlex.join(sys.argv[1:])
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from loadtests.harness.models import features, write_repository

    write_repository(args.repository, (args.model,))
    peers = build_peers(
        args.peers,
        args.repository,
        args.redis_url,
        args.triton_venv,
        tuple(shlex.split(args.rnnserve_args)),
    )
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    workers = Workers(args.workers, args.profile, args.profile_gil)
    started = time.time()
    meta: dict[str, Any] = {
        "command": command,
        "started_unix": started,
        "host": {
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "loadavg_before": _loadavg(),
        "model": args.model,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "workers": args.workers,
        "chunk": args.chunk,
        "stream_width": args.stream_width,
        "many_width": args.many_width,
    }
    points: list[dict[str, Any]] = []
    try:
        for peer in peers:
            modes = [m for m in args.modes if peer.serves(m, args.model)]
            if not modes:
                continue
            print(f"{peer.name}: starting", file=sys.stderr)
            peer.start()
            try:
                for mode in modes:
                    for sessions in args.sessions:
                        run_id = f"b{uuid.uuid4().hex[:10]}"
                        sequence_base = random.randrange(1, 2**40) << 16
                        n_workers = min(args.workers, sessions)
                        if mode == "kserve-stream" and peer.max_streams is not None:
                            if -(-sessions // args.stream_width) > peer.max_streams:
                                print(
                                    f"  {peer.name} {mode} {sessions} sessions: skipped (more "
                                    f"than {peer.max_streams} stream(s) crash this peer)",
                                    file=sys.stderr,
                                )
                                continue
                            n_workers = 1  # one stream: one worker
                        parts = _split(sessions, n_workers)
                        jobs = [
                            Job(
                                address=peer.address,
                                mode=mode,
                                model=args.model,
                                sessions=n,
                                first_session=first,
                                run_id=run_id,
                                warmup_s=args.warmup,
                                duration_s=args.duration,
                                chunk=args.chunk,
                                stream_width=args.stream_width,
                                sequence_base=sequence_base,
                                features=features(args.model),
                                many_width=args.many_width,
                            )
                            for n, first in parts
                        ]
                        label = f"{peer.name} {mode} {sessions} sessions"
                        results = workers.run(jobs, label, peer)
                        point = summarize(peer.name, mode, sessions, args.duration, results)
                        point.update(workers.last_cpu)
                        point["peer_crashed"] = workers.crashed or not peer.alive()
                        point["loadavg"] = _loadavg()
                        points.append(point)
                        print(
                            f"  {label:<44} {point['steps_per_s']:>9,.0f} steps/s  "
                            f"p50 {point['p50_ms']:7.1f} ms  p99 {point['p99_ms']:7.1f} ms  "
                            f"cpu/step server {point['server_cpu_us_per_step']:5.0f} us "
                            f"client {point['client_cpu_us_per_step']:5.0f} us"
                            + (
                                f"  batch {point['mean_batch']:.0f}, compute "
                                f"{point.get('compute_ms_per_batch', 0):.1f} ms"
                                if "mean_batch" in point
                                else ""
                            )
                            + (f"  errors {point['errors']}" if point["errors"] else ""),
                            file=sys.stderr,
                        )
                        if point["first_error"]:
                            print(f"    first error: {point['first_error'][:300]}", file=sys.stderr)
                        if point["peer_crashed"]:
                            print(f"  {peer.name} crashed: restarting it", file=sys.stderr)
                            peer.stop()
                            peer.start()
            finally:
                peer.stop()
    finally:
        workers.close()
        for peer in peers:
            peer.stop()
        # Whatever was measured is written, even when a peer or the run failed.
        meta["loadavg_after"] = _loadavg()
        meta["elapsed_s"] = round(time.time() - started, 1)
        if points:
            paths = write_outputs(meta, points, args.out, update_docs=args.update_docs)
            print(json.dumps({k: str(v) for k, v in paths.items()}, indent=1), file=sys.stderr)


if __name__ == "__main__":
    main()
