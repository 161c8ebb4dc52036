"""The alerts of `components/alerts` fire when they should, and only then: each one is
run by `promtool test rules` (Prometheus's own rule evaluator) over series shaped like
the server's, one case where it must fire and one where it must not.

promtool comes with Debian's `prometheus` package (`.ci/run` installs it when it is
missing); without it these tests are skipped.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RULE = ROOT / "deploy" / "kubernetes" / "components" / "alerts" / "prometheusrule.yaml"
PROMTOOL = shutil.which("promtool")
pytestmark = pytest.mark.skipif(PROMTOOL is None, reason="no promtool (apt-get install prometheus)")

NS = 'namespace="rnnserve"'
STEP = "/rnnserve.v1.Recurrent/Step"


def _rules() -> dict[str, dict[str, Any]]:
    spec = yaml.safe_load(RULE.read_text())["spec"]
    return {rule["alert"]: rule for group in spec["groups"] for rule in group["rules"]}


def expected(alert: str, value: str, **labels: str) -> dict[str, Any]:
    """An `exp_alerts` entry: the rule's labels plus `labels`, and its annotations with
    `$labels.x` filled in and `$value` (whatever its format) written as `value`."""
    rule = _rules()[alert]

    def fill(template: str) -> str:
        template = re.sub(r"\{\{ \$value( \| \w+)? \}\}", value, template)
        return re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m.group(1)], template)

    return {
        "exp_labels": {**rule["labels"], **labels},
        "exp_annotations": {k: fill(v) for k, v in rule["annotations"].items()},
    }


def promtool(tmp_path: Path, alert: str, series: list[tuple[str, str]], evals: list[Any]) -> None:
    """Run `promtool test rules` with the component's rule groups, `series` as
    (series, values) and `evals` as (minute, [expected alerts]) for `alert`."""
    groups = yaml.safe_load(RULE.read_text())["spec"]["groups"]
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    test = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": s, "values": v} for s, v in series],
                "alert_rule_test": [
                    {"eval_time": f"{minute}m", "alertname": alert, "exp_alerts": alerts}
                    for minute, alerts in evals
                ],
            }
        ],
    }
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(test))
    assert PROMTOOL is not None
    done = subprocess.run(
        [PROMTOOL, "test", "rules", "test.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_has_a_case_here() -> None:
    tested = {name.removeprefix("test_") for name in globals() if name.startswith("test_")}
    for alert in _rules():
        snake = re.sub(r"(?<!^)(?=[A-Z])", "_", alert.removeprefix("Rnnserve")).lower()
        assert any(name.startswith(snake) for name in tested), alert


def test_no_model_loaded_fires_for_a_pod_with_none_and_not_for_one_with_a_model(
    tmp_path: Path,
) -> None:
    # The series without model labels is 0 from the process's start (metrics.process_started).
    series = [
        # a: never loaded a model (all this test knows is the 0 from the start)
        (f'rnnserve_models_loaded{{{NS}, pod="a"}}', "0x30"),
        # b: serving lstm all along
        (f'rnnserve_models_loaded{{{NS}, pod="b"}}', "0x30"),
        (f'rnnserve_models_loaded{{{NS}, pod="b", model="lstm", version="1"}}', "1x30"),
        # c: its only version removed from the repository at minute 5 (unloaded: 0)
        (f'rnnserve_models_loaded{{{NS}, pod="c"}}', "0x30"),
        (f'rnnserve_models_loaded{{{NS}, pod="c", model="lstm", version="1"}}', "1x4 0x25"),
    ]
    a = expected("RnnserveNoModelLoaded", "", namespace="rnnserve", pod="a")
    c = expected("RnnserveNoModelLoaded", "", namespace="rnnserve", pod="c")
    promtool(
        tmp_path,
        "RnnserveNoModelLoaded",
        series,
        [(5, []), (12, [a]), (17, [a, c])],
    )


def test_store_errors_fire_on_a_rate_not_on_one_failed_call(tmp_path: Path) -> None:
    def calls(pod: str, loads: str, commits: str, errors: str) -> list[tuple[str, str]]:
        labels = f'{NS}, pod="{pod}", model="lstm", version="1"'
        return [
            (f"rnnserve_state_load_duration_seconds_count{{{labels}}}", loads),
            (f"rnnserve_state_commit_duration_seconds_count{{{labels}}}", commits),
            (f"rnnserve_store_errors_total{{{labels}}}", errors),
        ]

    series = [
        # a: one failed commit among 200 store calls a minute (a retried step)
        *calls("a", "0+100x20", "0+100x20", "0x3 1x17"),
        # b: 10% of its store calls fail: 10 loads, 8 commits and 2 failures a minute
        *calls("b", "0+10x20", "0+8x20", "0+2x20"),
        # c: the store is down: every load fails, nothing succeeds
        *calls("c", "0x20", "0x20", "0+20x20"),
        # d: 10% failing for 2 minutes only, then healthy again
        *calls("d", "0+10x20", "0+8x20", "0+2x2 4x18"),
    ]
    b = expected("RnnserveStoreErrors", "10%", namespace="rnnserve", pod="b")
    c = expected("RnnserveStoreErrors", "100%", namespace="rnnserve", pod="c")
    promtool(tmp_path, "RnnserveStoreErrors", series, [(4, []), (8, [b, c]), (15, [b, c])])


def test_high_error_rate_fires_over_one_percent_of_calls(tmp_path: Path) -> None:
    def calls(namespace: str, ok: str, internal: str) -> list[tuple[str, str]]:
        labels = f'namespace="{namespace}", pod="p", method="{STEP}", model="lstm"'
        return [
            (f'rnnserve_requests_total{{{labels}, code="OK"}}', ok),
            (f'rnnserve_requests_total{{{labels}, code="INTERNAL"}}', internal),
            # health checks are not calls of the model: never in the ratio
            (
                f'rnnserve_requests_total{{namespace="{namespace}", pod="p", '
                'method="/grpc.health.v1.Health/Check", model="", code="OK"}',
                "0+1000x30",
            ),
        ]

    # "bad": 2 of 100 calls fail; "fine": 1 of 200 (0.5%)
    series = [*calls("bad", "0+98x30", "0+2x30"), *calls("fine", "0+199x30", "0+1x30")]
    bad = expected("RnnserveHighErrorRate", "2%", namespace="bad")
    promtool(tmp_path, "RnnserveHighErrorRate", series, [(5, []), (15, [bad])])


def test_high_step_latency_p99_fires_over_250_ms(tmp_path: Path) -> None:
    def step_buckets(namespace: str, le_025: str, le_05: str, inf: str) -> list[tuple[str, str]]:
        labels = f'namespace="{namespace}", pod="p", method="{STEP}", model="lstm", code="OK"'
        name = "rnnserve_request_duration_seconds_bucket"
        return [
            (f'{name}{{{labels}, le="0.25"}}', le_025),
            (f'{name}{{{labels}, le="0.5"}}', le_05),
            (f'{name}{{{labels}, le="+Inf"}}', inf),
        ]

    # "slow": every step between 250 and 500 ms; "fast": every step under 250 ms
    series = [
        *step_buckets("slow", "0x30", "0+100x30", "0+100x30"),
        *step_buckets("fast", "0+100x30", "0+100x30", "0+100x30"),
    ]
    # p99 interpolated in the (0.25, 0.5] bucket: 0.25 + 0.25 * 0.99
    slow = expected("RnnserveHighStepLatencyP99", "497.5ms", namespace="slow")
    promtool(tmp_path, "RnnserveHighStepLatencyP99", series, [(5, []), (15, [slow])])


def test_queue_saturation_fires_over_80_percent_of_capacity(tmp_path: Path) -> None:
    def queue(pod: str, depth: str) -> list[tuple[str, str]]:
        labels = f'{NS}, pod="{pod}", model="lstm", version="1"'
        return [
            (f"rnnserve_queue_depth_steps{{{labels}}}", depth),
            (f"rnnserve_queue_capacity_steps{{{labels}}}", "8192x20"),
        ]

    series = [*queue("full", "7373x20"), *queue("busy", "4096x20")]  # 90% and 50%
    full = expected(
        "RnnserveQueueSaturation", f"{7373 / 8192 * 100:.4g}%",  # humanizePercentage
        namespace="rnnserve", pod="full", model="lstm", version="1",
    )  # fmt: skip
    promtool(tmp_path, "RnnserveQueueSaturation", series, [(3, []), (10, [full])])


def test_queue_rejections_fire_while_steps_are_refused(tmp_path: Path) -> None:
    labels = f'pod="p", method="{STEP}", model="lstm", code="RESOURCE_EXHAUSTED"'
    series = [
        # 60 refusals a minute in "refusing"; none in "calm" (the counter stays)
        (f'rnnserve_requests_total{{namespace="refusing", {labels}}}', "0+60x20"),
        (f'rnnserve_requests_total{{namespace="calm", {labels}}}', "5x20"),
    ]
    refusing = expected("RnnserveQueueRejections", "1", namespace="refusing")
    promtool(tmp_path, "RnnserveQueueRejections", series, [(3, []), (10, [refusing])])
