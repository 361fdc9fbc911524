"""Prometheus metrics and alert rules.

(a) ``promtool check rules`` / ``promtool test rules`` on deploy/prometheus (skipped when
    promtool is missing locally, a failure under ``CI``; ``.ci/install-prometheus.sh``
    installs it);
(b) a real Nexus with ``--metrics-listen 127.0.0.1:0``, scraped over plain HTTP while Pilot
    drives it through init, a denied call, a rotation, kill -9, a failed and a successful
    recovery: every metric is seen to move.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import PY, ROOT, TEST_PASSWORD, DevAgent, Nexus, base_env, pilot, pilot_json

RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
WRONG_PASSWORD = "marble lantern seventy crisp oboe"  # noqa: S105 - a test fixture
SECRET_PATH = "apps/billing/db"  # noqa: S105 - a test fixture
SECRET_VALUE = "s3cr3t-metrics-canary-value"  # noqa: S105 - a test fixture

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


# ---------------------------------------------------------------- (a) promtool


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is required under CI: run .ci/install-prometheus.sh")
        pytest.skip("promtool not installed (.ci/install-prometheus.sh installs it)")
    return found


def test_promtool_check_rules() -> None:
    result = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_promtool_test_rules() -> None:
    result = subprocess.run([promtool(), "test", "rules", str(RULE_TESTS)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_every_alert_has_severity_runbook_and_unit_tests() -> None:
    rules_text = RULES.read_text()
    tests_text = RULE_TESTS.read_text()
    alerts = [line.split(":", 1)[1].strip() for line in rules_text.splitlines()
              if line.strip().startswith("- alert:")]
    assert len(alerts) >= 8
    for alert in alerts:
        block = rules_text.split(f"- alert: {alert}\n", 1)[1].split("- alert:", 1)[0]
        assert "severity:" in block, alert
        runbook = block.split("runbook_url:", 1)[1].split()[0]
        assert runbook.startswith("docs/") and (ROOT / runbook).is_file(), (alert, runbook)
        # A firing case (exp_alerts with labels) and a quiet case (exp_alerts: []).
        cases = tests_text.split(f"alertname: {alert}\n")[1:]
        assert any(c.lstrip().startswith("exp_alerts: []") for c in cases), alert
        assert any(c.lstrip().startswith("exp_alerts:\n") for c in cases), alert


# ---------------------------------------------------------------- (b) a real Nexus


def scrape(address: str) -> tuple[str, Samples]:
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        body = response.read().decode()
        assert response.status == 200, body
    finally:
        conn.close()
    samples: Samples = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return body, samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def metrics_address(nexus: Nexus) -> str:
    for event in nexus.log_events():
        if event.get("event") == "metrics listening":
            return str(event["address"])
    raise AssertionError("no 'metrics listening' log line:\n" + "".join(nexus.lines[-20:]))


def start(agent: DevAgent, data_dir: Path) -> Nexus:
    return Nexus(data_dir, agent.env("nexus"),
                 args=["--metrics-listen", "127.0.0.1:0", "--recover-backoff-seconds", "0.05"])


def rpc_count(samples: Samples, method: str, code: str) -> float:
    return value(samples, "spike_nexus_rpc_duration_seconds_count",
                 method=method, code=code) or 0.0


STATUS = "/spike.v1.Operator/Status"
RECOVER = "/spike.v1.Operator/Recover"


@pytest.fixture()
def metered(agent: DevAgent, data_dir: Path) -> Iterator[list[Nexus]]:
    """The running Nexus (a list so that a restart can replace it); stopped at the end."""
    running = [start(agent, data_dir)]
    yield running
    running[0].stop()


def check_uninitialized(address: str) -> None:
    # ---- uninitialized
    _, s = scrape(address)
    assert value(s, "spike_nexus_state", state="uninitialized") == 1
    assert value(s, "spike_nexus_root_key_present") == 0
    assert value(s, "spike_nexus_sealed_with_data") == 0
    assert value(s, "spike_nexus_root_key_generation") == 0
    assert value(s, "spike_nexus_rotation_phase", phase="idle") == 1


def check_init(su: dict[str, str], nexus: Nexus, address: str) -> Samples:
    # ---- init
    started = time.time()
    result = pilot(["init", "--password-stdin"], su, nexus, stdin=TEST_PASSWORD + "\n")
    assert result.returncode == 0, result.stderr
    assert pilot(["secret", "put", SECRET_PATH, f"password={SECRET_VALUE}"], su,
                 nexus).returncode == 0
    _, s = scrape(address)
    assert value(s, "spike_nexus_root_key_present") == 1
    assert value(s, "spike_nexus_state", state="unsealed") == 1
    assert value(s, "spike_nexus_state", state="uninitialized") == 0
    assert value(s, "spike_nexus_root_key_generation") == 1
    created = value(s, "spike_nexus_root_key_created_timestamp_seconds")
    assert created is not None and started - 1 <= created <= time.time()
    age = value(s, "spike_nexus_root_key_age_seconds")
    assert age is not None and 0 <= age < 120
    assert value(s, "spike_nexus_backup_status", status="ok") == 1
    assert value(s, "spike_nexus_backup_present") == 1
    for stamp in ("verified", "written"):
        got = value(s, f"spike_nexus_backup_last_{stamp}_timestamp_seconds")
        assert got is not None and got >= started - 1, stamp
    assert value(s, "spike_nexus_backup_verify_interval_seconds") == 3600
    for check in ("core_dumps_disabled", "dumpable_off", "key_memory_locked"):
        assert value(s, "spike_nexus_hardening", check=check) in (0, 1), check
    assert value(s, "spike_nexus_hardening", check="core_dumps_disabled") == 1
    assert value(s, "spike_nexus_hardening", check="dumpable_off") == 1
    assert (value(s, "spike_nexus_encryptions_total", generation="1") or 0) >= 1
    assert value(s, "spike_nexus_active_key_encryptions") == value(
        s, "spike_nexus_encryptions_total", generation="1")
    assert value(s, "spike_nexus_encryptions_safe_limit") == 2**32
    assert (value(s, "spike_nexus_records", generation="1") or 0) >= 1
    next_rotation = value(s, "spike_nexus_rotation_next_timestamp_seconds")
    assert next_rotation is not None and next_rotation > time.time()
    assert rpc_count(s, "/spike.v1.Operator/Init", "OK") == 1
    assert rpc_count(s, "/spike.v1.Secrets/Put", "OK") == 1
    return s


def check_denial(agent: DevAgent, nexus: Nexus, address: str, s: Samples) -> None:
    # ---- a denied call: a workload may not call Status
    denied_before = value(s, "spike_nexus_denied_calls_total", method=STATUS,
                          reason="forbidden") or 0
    result = pilot(["status"], agent.env("workload"), nexus)
    assert result.returncode == 4, (result.returncode, result.stderr)
    _, s = scrape(address)
    assert value(s, "spike_nexus_denied_calls_total", method=STATUS,
                 reason="forbidden") == denied_before + 1
    assert rpc_count(s, STATUS, "PERMISSION_DENIED") == 1


def check_rotation(su: dict[str, str], nexus: Nexus, address: str) -> float:
    # ---- a rotation
    rotation_started = time.time()
    result = pilot(["rotate", "--output", "json"], su, nexus)
    assert result.returncode == 0, result.stderr
    _, s = scrape(address)
    assert value(s, "spike_nexus_root_key_generation") == 2
    assert value(s, "spike_nexus_rotation_phase", phase="completed") == 1
    assert value(s, "spike_nexus_rotation_phase", phase="idle") == 0
    assert value(s, "spike_nexus_rotation_in_progress") == 0
    assert value(s, "spike_nexus_rotation_from_generation") == 1
    assert value(s, "spike_nexus_rotation_to_generation") == 2
    total = value(s, "spike_nexus_rotation_records", count="total")
    assert total is not None and total >= 1
    assert value(s, "spike_nexus_rotation_records", count="done") == total
    assert value(s, "spike_nexus_rotation_records", count="failed") == 0
    last_success = value(s, "spike_nexus_rotation_last_success_timestamp_seconds")
    assert last_success is not None and rotation_started - 1 <= last_success <= time.time()
    assert value(s, "spike_nexus_rotation_failures_total") == 0
    assert value(s, "spike_nexus_records", generation="2") == total
    assert value(s, "spike_nexus_records", generation="1") is None
    # Generation 1 was wiped from memory, so it is no longer reported.
    assert value(s, "spike_nexus_encryptions_total", generation="1") is None
    assert (value(s, "spike_nexus_encryptions_total", generation="2") or 0) >= total
    assert rpc_count(s, "/spike.v1.Operator/StartRotation", "OK") == 1
    return last_success


def check_restarted_sealed(address: str, last_success: float) -> None:
    """After kill -9 and a restart: sealed with data."""
    _, s = scrape(address)
    assert value(s, "spike_nexus_root_key_present") == 0
    assert value(s, "spike_nexus_sealed_with_data") == 1
    assert value(s, "spike_nexus_state", state="sealed") == 1
    assert value(s, "spike_nexus_root_key_generation") == 0
    assert value(s, "spike_nexus_hardening", check="key_memory_locked") == 0
    assert value(s, "spike_nexus_recover_failures_total") == 0
    # The last rotation's outcome is persisted, so it survives the restart.
    assert value(s, "spike_nexus_rotation_phase", phase="completed") == 1
    assert value(s, "spike_nexus_rotation_last_success_timestamp_seconds") == last_success
    assert value(s, "spike_nexus_rotation_next_timestamp_seconds") is None


def check_recoveries(su: dict[str, str], nexus: Nexus, address: str) -> Samples:
    # ---- a failed recovery
    result = pilot(["recover", "--password-stdin"], su, nexus, stdin=WRONG_PASSWORD + "\n")
    assert result.returncode == 8, (result.returncode, result.stderr)
    _, s = scrape(address)
    assert value(s, "spike_nexus_recover_failures_total") == 1
    assert value(s, "spike_nexus_root_key_present") == 0
    assert rpc_count(s, RECOVER, "UNAUTHENTICATED") == 1

    # ---- a successful recovery (after the short backoff)
    deadline = time.monotonic() + 30
    while True:
        result = pilot(["recover", "--password-stdin"], su, nexus, stdin=TEST_PASSWORD + "\n")
        if result.returncode == 0 or time.monotonic() > deadline or "retry in" not in result.stderr:
            break
        time.sleep(0.05)
    assert result.returncode == 0, result.stderr
    _, s = scrape(address)
    assert value(s, "spike_nexus_root_key_present") == 1
    assert value(s, "spike_nexus_sealed_with_data") == 0
    assert value(s, "spike_nexus_state", state="unsealed") == 1
    assert value(s, "spike_nexus_root_key_generation") == 2
    assert value(s, "spike_nexus_recover_failures_total") == 1
    assert rpc_count(s, RECOVER, "OK") == 1
    return s


def check_histogram_and_privacy(su: dict[str, str], nexus: Nexus, address: str, s: Samples,
                                data_dir: Path) -> None:
    # ---- RPC latency histogram counts increase, buckets are consistent
    before = rpc_count(s, STATUS, "OK")
    for _ in range(3):
        pilot_json(["status", "--output", "json"], su, nexus)
    body, s = scrape(address)
    assert rpc_count(s, STATUS, "OK") == before + 3
    inf = value(s, "spike_nexus_rpc_duration_seconds_bucket", method=STATUS, code="OK", le="+Inf")
    assert inf == before + 3
    total_seconds = value(s, "spike_nexus_rpc_duration_seconds_sum", method=STATUS, code="OK")
    assert total_seconds is not None and 0 < total_seconds < 3 + before

    # ---- nothing secret, no caller IDs, bounded method labels
    for needle in (SECRET_PATH, SECRET_VALUE, TEST_PASSWORD, WRONG_PASSWORD, "spiffe://",
                   str(data_dir)):
        assert needle not in body, needle
    methods = {v for (_, labels) in s for k, v in labels if k == "method"}
    assert methods and all(m.startswith(("/spike.v1.", "/grpc.")) for m in methods)


def test_metrics_follow_init_denial_rotation_restart_and_recovery(
    agent: DevAgent, data_dir: Path, metered: list[Nexus]
) -> None:
    nexus = metered[0]
    address = metrics_address(nexus)
    assert address.startswith("127.0.0.1:") and not address.endswith(":0")
    su = agent.env("pilot")

    check_uninitialized(address)
    s = check_init(su, nexus, address)
    check_denial(agent, nexus, address, s)
    last_success = check_rotation(su, nexus, address)
    # ---- kill -9 and restart: sealed with data
    nexus.kill()
    nexus = metered[0] = start(agent, data_dir)
    address = metrics_address(nexus)
    check_restarted_sealed(address, last_success)
    s = check_recoveries(su, nexus, address)
    check_histogram_and_privacy(su, nexus, address, s, data_dir)


def test_metrics_are_off_by_default(nexus: Nexus) -> None:
    events = nexus.log_events()
    assert not any(e.get("event") == "metrics listening" for e in events)


def test_bad_metrics_address_is_a_clean_startup_error(agent: DevAgent, data_dir: Path) -> None:
    result = subprocess.run(
        [PY, "-m", "nexus", "--listen", "127.0.0.1:0", "--data-dir", str(data_dir),
         "--insecure-test-kdf", "--metrics-listen", "no-port-here"],
        env={**base_env(), **agent.env("nexus")}, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1, result.stderr
    assert "--metrics-listen must be HOST:PORT" in result.stderr
    assert "Traceback" not in result.stderr
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert any(e.get("event") == "cannot start" for e in lines)
