"""Benchmark output: per-point summary, JSON, Markdown tables, PNG plots, docs/benchmarks.md."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from loadtests.harness.load import Result

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "benchmarks.md"
DOC_IMG = ROOT / "docs" / "img"
BEGIN, END = "<!-- bench_grpc:begin -->", "<!-- bench_grpc:end -->"
MODE_TITLES = {
    "step": "native unary Step",
    "stream": "native bidi StepStream",
    "runseq": "native RunSequence (chunks)",
    "kserve": "KServe v2 ModelInfer (tritonclient aio)",
    "kserve-stream": "KServe v2 ModelStreamInfer (tritonclient aio)",
    "many": "native StepManyStream (one message per gateway of sessions)",
}


def summarize(
    peer: str, mode: str, sessions: int, duration_s: float, results: list[Result]
) -> dict[str, Any]:
    latencies = np.concatenate([np.asarray(r.latencies_ms, dtype=float) for r in results])
    steps = sum(r.steps for r in results)

    def pct(q: float) -> float:
        return float(np.percentile(latencies, q)) if latencies.size else float("nan")

    return {
        "peer": peer,
        "mode": mode,
        "sessions": sessions,
        "steps": steps,
        "calls": sum(r.calls for r in results),
        "steps_per_s": steps / duration_s,
        "p50_ms": pct(50),
        "p90_ms": pct(90),
        "p99_ms": pct(99),
        "errors": sum(r.errors for r in results),
        "first_error": next((r.first_error for r in results if r.first_error), ""),
    }


def _index(points: list[dict[str, Any]]) -> dict[tuple[str, str, int], dict[str, Any]]:
    return {(p["peer"], p["mode"], p["sessions"]): p for p in points}


def _order(values: list[str], preferred: list[str]) -> list[str]:
    seen = list(dict.fromkeys(values))
    return sorted(seen, key=lambda v: preferred.index(v) if v in preferred else len(preferred))


def markdown(meta: dict[str, Any], points: list[dict[str, Any]], img_prefix: str) -> str:
    index = _index(points)
    peers = _order([p["peer"] for p in points], ["echo", "unbatched", "memory", "redis"])
    modes = _order([p["mode"] for p in points], list(MODE_TITLES))
    sessions = sorted({p["sessions"] for p in points})
    lines = [
        f"    {meta['command']}",
        "",
        f"Model `{meta['model']}`; {meta['workers']} load-generator processes; "
        f"{meta['warmup_s']:g} s warm-up + {meta['duration_s']:g} s measured per point; "
        f"RunSequence chunks of {meta['chunk']} steps (latency is per call); "
        f"{meta['stream_width']} sessions per stream; "
        f"{meta.get('many_width', 256)} sessions per StepMany message. "
        "Load average before / after: "
        f"{meta['loadavg_before']} / {meta['loadavg_after']} on {meta['host']['cpus']} CPUs "
        f"({meta['host']['machine']}, Python {meta['host']['python']}); run took "
        f"{meta['elapsed_s']:.0f} s. Cells: steps/s, then p50 / p99 latency in ms.",
        "",
    ]
    for mode in modes:
        mode_peers = [p for p in peers if any((p, mode, s) in index for s in sessions)]
        lines.append(f"**{MODE_TITLES.get(mode, mode)}**")
        lines.append("")
        lines.append("| sessions | " + " | ".join(mode_peers) + " |")
        lines.append("|---:|" + "---:|" * len(mode_peers))
        for s in sessions:
            cells = []
            for peer in mode_peers:
                p = index.get((peer, mode, s))
                if p is None:
                    cells.append("")
                    continue
                err = f" ({p['errors']} err)" if p["errors"] else ""
                if p.get("peer_crashed"):
                    err += " **crashed**"
                cells.append(
                    f"{p['steps_per_s']:,.0f} · {p['p50_ms']:.1f} / {p['p99_ms']:.1f}{err}"
                )
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
        lines.append("")
    if any("server_cpu_us_per_step" in p for p in points):
        lines.append(
            "**CPU per step** (µs of CPU time, user + system, per completed step over the "
            "whole point: server process tree / load-generator processes; for a single "
            "rnnserve process, from its /metrics: mean batch and mean compute time per batch)"
        )
        lines.append("")
        lines.append("| peer | mode | " + " | ".join(f"{s} sessions" for s in sessions) + " |")
        lines.append("|---|---|" + "---:|" * len(sessions))
        for peer in peers:
            for mode in modes:
                row = [index.get((peer, mode, s)) for s in sessions]
                if not any(row):
                    continue
                cells = [
                    f"{p['server_cpu_us_per_step']:.0f} / {p['client_cpu_us_per_step']:.0f}"
                    + (
                        f" (batch {p['mean_batch']:.0f}, {p['compute_ms_per_batch']:.1f} ms)"
                        if "compute_ms_per_batch" in p
                        else ""
                    )
                    if p
                    and "server_cpu_us_per_step" in p
                    and p["steps"] > 0
                    and not p.get("peer_crashed")
                    else ("crashed" if p and p.get("peer_crashed") else "no steps" if p else "")
                    for p in row
                ]
                lines.append(f"| {peer} | {mode} | " + " | ".join(cells) + " |")
        lines.append("")
    ratios = target_ratios(points)
    if ratios:
        lines.append("| ratio (same run) | value |")
        lines.append("|---|---:|")
        for name, value in ratios:
            lines.append(f"| {name} | {value:.2f}x |")
        lines.append("")
    goals = targets(points)
    if goals:
        lines.append("**Targets (issue 11), from this run**")
        lines.append("")
        lines.append("| target | measured | met? |")
        lines.append("|---|---|---|")
        for name, measured, met in goals:
            lines.append(f"| {name} | {measured} | {met} |")
        lines.append("")
    lines.append(f"![throughput vs sessions]({img_prefix}bench_grpc_throughput.png)")
    lines.append(f"![p50 and p99 latency vs sessions]({img_prefix}bench_grpc_latency.png)")
    return "\n".join(lines) + "\n"


def _usable(p: dict[str, Any] | None) -> dict[str, Any] | None:
    """The point, if it measured steps on a peer that did not crash."""
    return p if p and p["steps_per_s"] > 0 and not p.get("peer_crashed") else None


def target_ratios(points: list[dict[str, Any]]) -> list[tuple[str, float]]:
    index = _index(points)
    out: list[tuple[str, float]] = []

    def rate(peer: str, mode: str, s: int) -> float | None:
        p = _usable(index.get((peer, mode, s)))
        return p["steps_per_s"] if p else None

    def add(name: str, a: float | None, b: float | None) -> None:
        if a is not None and b is not None:
            out.append((name, a / b))

    redis_peers = sorted({p["peer"] for p in points if p["peer"].startswith("redis")})
    for peer in redis_peers:
        add(
            f"{peer} / echo, stream, 256 sessions",
            rate(peer, "stream", 256),
            rate("echo", "stream", 256),
        )
    for peer in ("memory", *redis_peers):
        for mode in ("stream", "step"):
            add(
                f"{peer} / unbatched, {mode}, 256 sessions",
                rate(peer, mode, 256),
                rate("unbatched", mode, 256),
            )
    for peer in ("memory", *redis_peers):
        for mode in ("kserve", "kserve-stream"):
            for s in (64, 256):
                add(
                    f"{peer} / triton, {mode}, {s} sessions",
                    rate(peer, mode, s),
                    rate("triton", mode, s),
                )
    for peer in ("memory", *redis_peers):
        add(
            f"{peer} many / triton kserve, 256 sessions",
            rate(peer, "many", 256),
            rate("triton", "kserve", 256),
        )
        add(
            f"{peer} many / echo many, 256 sessions",
            rate(peer, "many", 256),
            rate("echo", "many", 256),
        )
    return out


QUEUE_DELAY_MS = 2.0  # rnnserve's default max_queue_delay_ms, which the peers run


def targets(points: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """Issue 11's targets from one run: (target, measured, met: yes / no / not measured)."""
    index = _index(points)

    def get(peer: str, mode: str, s: int) -> dict[str, Any] | None:
        return _usable(index.get((peer, mode, s)))

    def verdict(flags: list[bool]) -> str:
        if not flags:
            return "not measured"
        return "yes" if all(flags) else "no"

    out: list[tuple[str, str, str]] = []
    # 1. CPU per step vs echo (memory store), and what Redis adds.
    cells, flags = [], []
    for mode in ("stream", "step", "kserve", "kserve-stream", "many"):
        for s in (64, 256):
            mem, echo = get("memory", mode, s), get("echo", mode, s)
            if mem and echo:
                ratio = mem["server_cpu_us_per_step"] / echo["server_cpu_us_per_step"]
                cells.append(f"{mode} {s}: {ratio:.2f}x")
                flags.append(ratio <= 1.3)
    out.append(("server CPU per step <= 1.3x echo's, memory store", "; ".join(cells),
                verdict(flags)))  # fmt: skip
    cells, flags = [], []
    for mode in ("stream", "step", "kserve", "kserve-stream", "many"):
        mem, red = get("memory", mode, 256), get("redis", mode, 256)
        if mem and red:
            extra = red["server_cpu_us_per_step"] - mem["server_cpu_us_per_step"]
            cells.append(f"{mode}: {extra:+.0f} µs")
            flags.append(extra <= 40)
    out.append(("Redis store adds <= 40 µs of server CPU per step (256 sessions)",
                "; ".join(cells), verdict(flags)))  # fmt: skip
    # 2. KServe vs Triton.
    cells, flags = [], []
    for mode in ("kserve", "kserve-stream"):
        for s in (64, 256):
            triton = get("triton", mode, s)
            ours = [
                (p["steps_per_s"], peer)
                for peer in ("memory", "redis", "redis-x2")
                if (p := get(peer, mode, s))
            ]
            if triton and ours:
                rate, peer = max(ours)
                ratio = rate / triton["steps_per_s"]
                cells.append(f"{mode} {s}: {ratio:.2f}x ({peer})")
                flags.append(ratio >= 1.0)
    out.append(("KServe ModelInfer / ModelStreamInfer >= 1.0x Triton at 64 and 256",
                "; ".join(cells), verdict(flags)))  # fmt: skip
    # 3. Redis StepStream vs echo.
    red, echo = get("redis", "stream", 256), get("echo", "stream", 256)
    if red and echo:
        ratio = red["steps_per_s"] / echo["steps_per_s"]
        out.append(("Redis StepStream >= 0.70x echo at 256 sessions", f"{ratio:.2f}x",
                    verdict([ratio >= 0.7])))  # fmt: skip
    else:
        out.append(("Redis StepStream >= 0.70x echo at 256 sessions", "", "not measured"))
    # 4. The many-session message vs Triton's best ModelInfer at 256.
    triton = get("triton", "kserve", 256)
    cells, flags = [], []
    for peer in ("memory", "redis", "redis-x2"):
        many = get(peer, "many", 256)
        if many and triton:
            ratio = many["steps_per_s"] / triton["steps_per_s"]
            cells.append(f"{peer}: {many['steps_per_s']:,.0f} = {ratio:.1f}x")
            flags.append(ratio >= 5.0)
    if triton:
        cells.append(f"Triton ModelInfer: {triton['steps_per_s']:,.0f}")
    out.append(("StepManyStream >= 5x Triton's ModelInfer at 256 sessions", "; ".join(cells),
                "yes" if any(flags) else verdict(flags)))  # fmt: skip
    # 5. p99 at half of the peak load (memory store, each mode it served).
    cells, flags = [], []
    for mode in ("stream", "many"):
        rows = [p for p in points if p["peer"] == "memory" and p["mode"] == mode and _usable(p)]
        if len(rows) < 2:
            continue
        peak = max(p["steps_per_s"] for p in rows)
        half = min(rows, key=lambda p: abs(p["steps_per_s"] - peak / 2))
        if "compute_ms_per_batch" not in half:
            continue
        bound = 2 * (QUEUE_DELAY_MS + half["compute_ms_per_batch"])
        cells.append(
            f"{mode}: {half['p99_ms']:.1f} ms at {half['sessions']} sessions "
            f"({half['steps_per_s']:,.0f} of peak {peak:,.0f} steps/s; bound {bound:.1f} ms)"
        )
        flags.append(half["p99_ms"] <= bound)
    out.append(("p99 at half of peak <= 2 x (queue delay + one batch's compute)",
                "; ".join(cells), verdict(flags)))  # fmt: skip
    return out


def plots(points: list[dict[str, Any]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    index = _index(points)
    peers = _order([p["peer"] for p in points], ["echo", "unbatched", "memory", "redis"])
    modes = _order([p["mode"] for p in points], list(MODE_TITLES))
    colors = {peer: f"C{i}" for i, peer in enumerate(peers)}
    paths = []
    for kind in ("throughput", "latency"):
        fig, axes = plt.subplots(
            1,
            len(modes),
            figsize=(4.2 * len(modes), 3.6),
            squeeze=False,
            sharey=(kind == "latency"),
        )
        for ax, mode in zip(axes[0], modes, strict=True):
            for peer in peers:
                rows = sorted(
                    (p for (pe, mo, _), p in index.items() if pe == peer and mo == mode),
                    key=lambda p: p["sessions"],
                )
                if not rows:
                    continue
                xs = [p["sessions"] for p in rows]
                if kind == "throughput":
                    ax.plot(
                        xs, [p["steps_per_s"] for p in rows], "o-", color=colors[peer], label=peer
                    )
                else:
                    ax.plot(
                        xs,
                        [p["p99_ms"] for p in rows],
                        "o-",
                        color=colors[peer],
                        label=f"{peer} p99",
                    )
                    ax.plot(xs, [p["p50_ms"] for p in rows], "o--", color=colors[peer], alpha=0.6)
            ax.set_xscale("log", base=2)
            ax.set_title(MODE_TITLES.get(mode, mode), fontsize=9)
            ax.set_xlabel("concurrent sessions")
            if kind == "latency":
                ax.set_yscale("log")
            ax.grid(True, alpha=0.3)
        axes[0][0].set_ylabel(
            "steps/s" if kind == "throughput" else "latency ms (p99 solid, p50 dashed)"
        )
        axes[0][-1].legend(fontsize=7)
        fig.tight_layout()
        path = out / f"bench_grpc_{kind}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def write_outputs(
    meta: dict[str, Any], points: list[dict[str, Any]], out: Path, *, update_docs: bool
) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime(meta["started_unix"]))
    meta = {**meta, "date": stamp}
    json_path = out / "bench_grpc.json"
    json_path.write_text(json.dumps({"meta": meta, "points": points}, indent=1))
    md_path = out / "bench_grpc.md"
    md_path.write_text(markdown(meta, points, ""))
    paths = {"json": json_path, "markdown": md_path}
    for path in plots(points, out):
        paths[path.stem] = path
    if update_docs:
        DOC_IMG.mkdir(parents=True, exist_ok=True)
        for name in ("bench_grpc_throughput.png", "bench_grpc_latency.png"):
            shutil.copy(out / name, DOC_IMG / name)
        (DOC_IMG / "bench_grpc.json").write_text(json_path.read_text())
        body = f"Run of {stamp}.\n\n" + markdown(meta, points, "img/")
        text = DOC.read_text()
        block = f"{BEGIN}\n{body}{END}"
        if BEGIN in text and END in text:
            head, rest = text.split(BEGIN, 1)
            text = head + block + rest.split(END, 1)[1]
        else:
            text = text.rstrip("\n") + "\n\n## gRPC server vs peers\n\n" + block + "\n"
        DOC.write_text(text)
        paths["doc"] = DOC
    return paths
