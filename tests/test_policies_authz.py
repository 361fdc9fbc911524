"""Policies and the authorization matrix over real SVIDs from the dev agent's CA.

Identities: the superuser Pilot, the recover role, workload/demo (with a read/write/list
policy on ``app/.*``), workload/reader (read only on ``app/.*``) and workload/other (no
policy). Every Secrets and Policies RPC, and the Operator RPCs that matter here, is called
on raw mTLS channels; each denial must leave an audit line.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any, cast

import grpc
import pytest

from devagent.ca import CertificateAuthority
from nexus.api.authz import rpc_rules
from nexus.core.policies import (
    DECISION_CACHE_ENTRIES,
    Policy,
    PolicyEngine,
    _Compiled,
    compile_pattern,
)
from spike.identity import SvidMaterial, fetch_svid, material_from_pem
from spike.tls import client_channel
from spike.v1 import (
    operator_pb2,
    operator_pb2_grpc,
    policies_pb2,
    policies_pb2_grpc,
    secrets_pb2,
    secrets_pb2_grpc,
)
from tests.harness import (
    DevAgent,
    Nexus,
    audit_events,
    pem_env,
    pilot,
    pilot_json,
    short_tmpdir,
    start_unsealed,
    wait_for,
)

TD = "spike.internal"
TLS_NAME = "nexus.spike.internal"
SU = f"spiffe://{TD}/spike/pilot/role/superuser"
DEMO = f"spiffe://{TD}/workload/demo"
READER = f"spiffe://{TD}/workload/reader"
OTHER = f"spiffe://{TD}/workload/other"
DENIED = {grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED}


@pytest.fixture(scope="module")
def server(agent: DevAgent) -> Iterator[Nexus]:
    data_dir = short_tmpdir("nxa-")
    running = start_unsealed(agent, data_dir)
    su = agent.env("pilot")
    pilot_json(["policy", "put", "demo-rw", "--spiffe-id-pattern",
                r"spiffe://spike\.internal/workload/demo", "--path-pattern", "app/.*",
                "--permissions", "read,write,list", "--output", "json"], su, running)
    pilot_json(["policy", "put", "reader-ro", "--spiffe-id-pattern",
                r"spiffe://spike\.internal/workload/reader", "--path-pattern", "app/.*",
                "--permissions", "read", "--output", "json"], su, running)
    for path in ("app/seed", "app/team/one", "ops/seed", "ops/other"):
        pilot_json(["secret", "put", path, "k=v", "--output", "json"], su, running)
    yield running
    running.stop()
    shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def identities(agent: DevAgent, agent_ca_dir: Path) -> dict[str, SvidMaterial]:
    ca = CertificateAuthority.load(agent_ca_dir)
    found = {
        "superuser": fetch_svid(agent.socket("pilot")),
        "recover": fetch_svid(agent.socket("recover")),
        "demo": fetch_svid(agent.socket("workload")),
    }
    for name, spiffe_id in (("reader", READER), ("other", OTHER)):
        leaf = ca.issue_svid(spiffe_id)
        found[name] = material_from_pem(leaf.cert_chain_pem(), leaf.key_pem(), ca.bundle_pem())
    return found


def code_of(call: Callable[[], Any]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def authz_denied(call: Callable[[], Any]) -> tuple[bool, grpc.StatusCode, str]:
    """(denied by authorization?, status code, spike-error-kind)."""
    try:
        call()
    except grpc.RpcError as err:
        trailers = cast(grpc.Call, err).trailing_metadata() or ()  # a stub's error is a Call
        kind = str(dict(trailers).get("spike-error-kind", ""))
        return kind in ("permission_denied", "unauthenticated"), err.code(), kind
    return False, grpc.StatusCode.OK, ""


# ---------------------------------------------------------------- the matrix


def secrets_calls(stub: Any, path: str) -> dict[str, Callable[[], Any]]:
    """Every Secrets RPC, ordered so that each succeeds for an identity allowed to make it."""
    t = 10
    return {
        "Put": lambda: stub.Put(secrets_pb2.PutSecretRequest(path=path, data={"a": "1"}),
                                timeout=t),
        "Get": lambda: stub.Get(secrets_pb2.GetSecretRequest(path=path), timeout=t),
        "Metadata": lambda: stub.Metadata(secrets_pb2.SecretMetadataRequest(path=path),
                                          timeout=t),
        "Delete": lambda: stub.Delete(secrets_pb2.DeleteSecretRequest(path=path), timeout=t),
        "Undelete": lambda: stub.Undelete(
            secrets_pb2.UndeleteSecretRequest(path=path, versions=[1]), timeout=t),
        "Destroy": lambda: stub.Destroy(
            secrets_pb2.DestroySecretRequest(path=path, versions=[1]), timeout=t),
    }


def policies_calls(stub: Any, name: str) -> dict[str, Callable[[], Any]]:
    t = 10
    policy = policies_pb2.Policy(name=name, spiffe_id_pattern="spiffe://x/y", path_pattern="z",
                                 permissions=[policies_pb2.PERMISSION_READ])
    return {
        "Put": lambda: stub.Put(policies_pb2.PutPolicyRequest(policy=policy), timeout=t),
        "Get": lambda: stub.Get(policies_pb2.GetPolicyRequest(name=name), timeout=t),
        "List": lambda: stub.List(policies_pb2.ListPoliciesRequest(), timeout=t),
        "Delete": lambda: stub.Delete(policies_pb2.DeletePolicyRequest(name=name), timeout=t),
    }


def operator_calls(stub: Any) -> dict[str, Callable[[], Any]]:
    """Operator RPCs that are safe to call on a live node (no rotation is started)."""
    t = 10
    return {
        "Status": lambda: stub.Status(operator_pb2.StatusRequest(), timeout=t),
        "Init": lambda: stub.Init(operator_pb2.InitRequest(password=b"x"), timeout=t),
        "Recover": lambda: stub.Recover(operator_pb2.RecoverRequest(password=b""), timeout=t),
        "BackupStatus": lambda: stub.BackupStatus(operator_pb2.BackupStatusRequest(),
                                                  timeout=t),
        "BackupExport": lambda: stub.BackupExport(operator_pb2.BackupExportRequest(),
                                                  timeout=t),
        "ChangePassword": lambda: stub.ChangePassword(
            operator_pb2.ChangePasswordRequest(old_password=b"", new_password=b""), timeout=t),
        "RotationStatus": lambda: stub.RotationStatus(operator_pb2.RotationStatusRequest(),
                                                      timeout=t),
        "GetRotationSchedule": lambda: stub.GetRotationSchedule(
            operator_pb2.GetRotationScheduleRequest(), timeout=t),
    }


# For the workloads and the recover role these may never run: they would act on the node.
DESTRUCTIVE_OPERATOR = ("StartRotation", "AbortRotation", "ResumeRotation",
                        "SetRotationSchedule", "BackupVerify")

SECRETS_EXPECTED = {
    # identity: (allowed on its own app/ path, allowed on ops/ path)
    "superuser": (True, True),
    "recover": (False, False),
    "demo": (True, False),
    "other": (False, False),
}
OPERATOR_ALLOWED = {
    "superuser": set(operator_calls(None)),
    "recover": {"Status", "Recover", "BackupStatus"},
    "demo": set(),
    "reader": set(),
    "other": set(),
}


Table = list[tuple[str, str, str, bool]]


def _matrix_secrets(who: str, channel: grpc.Channel, table: Table) -> int:
    """Secrets: on a path of its own under app/, and on ops/ (no workload policy).
    Returns the number of denials."""
    denials = 0
    secrets = secrets_pb2_grpc.SecretsStub(channel)
    if who == "reader":
        plan = {"app/seed": {"Get", "Metadata"}, "ops/seed": set()}
    else:
        own, ops = SECRETS_EXPECTED[who]
        plan = {f"app/{who}": set(secrets_calls(None, "")) if own else set(),
                f"ops/{who}": set(secrets_calls(None, "")) if ops else set()}
    for path, allowed in plan.items():
        if not allowed and path.startswith(("app/", "ops/")) and path.count("/") == 1:
            path = "app/seed" if path.startswith("app/") else "ops/seed"
        for rpc, call in secrets_calls(secrets, path).items():
            code = code_of(call)
            expect = rpc in allowed
            table.append((who, f"Secrets/{rpc} {path}", code.name, expect))
            if expect:
                assert code == grpc.StatusCode.OK, (who, rpc, path, code)
            else:
                assert code == grpc.StatusCode.PERMISSION_DENIED, (who, rpc, path, code)
                denials += 1
    return denials


def _matrix_policies(who: str, channel: grpc.Channel, table: Table) -> int:
    denials = 0
    policies = policies_pb2_grpc.PoliciesStub(channel)
    for rpc, call in policies_calls(policies, f"tmp-{who}").items():
        code = code_of(call)
        expect = who == "superuser"
        table.append((who, f"Policies/{rpc}", code.name, expect))
        if expect:
            assert code == grpc.StatusCode.OK, (who, rpc, code)
        else:
            assert code in DENIED, (who, rpc, code)
            denials += 1
    return denials


def _matrix_operator(who: str, channel: grpc.Channel, table: Table) -> int:
    denials = 0
    operator = operator_pb2_grpc.OperatorStub(channel)
    for rpc, call in operator_calls(operator).items():
        denied, code, kind = authz_denied(call)
        expect = rpc in OPERATOR_ALLOWED[who]
        table.append((who, f"Operator/{rpc}", f"{code.name}/{kind}", expect))
        if expect:
            # Reaches the servicer (which may refuse for its own reasons, such as
            # a wrong password or "already initialized").
            assert not denied, (who, rpc, code, kind)
        else:
            assert denied and code == grpc.StatusCode.PERMISSION_DENIED, (who, rpc, code)
            denials += 1
    return denials


def test_authorization_matrix(server: Nexus, identities: dict[str, SvidMaterial]) -> None:
    denials = 0
    table: Table = []
    for who, material in identities.items():
        channel = client_channel(server.address, material, TLS_NAME)
        try:
            denials += _matrix_secrets(who, channel, table)
            denials += _matrix_policies(who, channel, table)
            denials += _matrix_operator(who, channel, table)
        finally:
            channel.close()

    # The rotation RPCs that would act are checked against the table only.
    rules = rpc_rules(TD)
    for rpc in DESTRUCTIVE_OPERATOR:
        rule = rules[f"/spike.v1.Operator/{rpc}"]
        assert not rule.allows(DEMO) and not rule.allows(OTHER)

    print("\n" + "\n".join(f"{w:10} {r:28} {c:20} {'allow' if e else 'deny'}"
                           for w, r, c, e in table))

    # Every denial left an audit line.
    def denial_lines() -> list[dict[str, Any]]:
        return [e for e in audit_events(server.data_dir)
                if e.get("outcome") == "permission_denied" or e.get("action") == "rpc.denied"]

    assert wait_for(lambda: len(denial_lines()) >= denials)
    lines = denial_lines()
    callers = {e["caller"] for e in lines}
    assert {identities[w].spiffe_id for w in ("recover", "demo", "reader", "other")} <= callers
    assert any(e["action"] == "secret.get" and e["caller"] == OTHER and e["target"] == "app/seed"
               for e in lines)
    assert any(e["action"] == "rpc.denied" and e["caller"] == DEMO
               and e["target"] == "/spike.v1.Policies/Put" for e in lines)


def test_list_returns_only_allowed_paths(server: Nexus,
                                         identities: dict[str, SvidMaterial]) -> None:
    expected = {
        "superuser": None,  # everything
        "demo": ["app/seed", "app/team/one"],
        "reader": [],  # read but no list permission
        "recover": [],
        "other": [],
    }
    for who, want in expected.items():
        channel = client_channel(server.address, identities[who], TLS_NAME)
        try:
            stub = secrets_pb2_grpc.SecretsStub(channel)
            paths = list(stub.List(secrets_pb2.ListSecretsRequest(prefix=""), timeout=10).paths)
            if want is None:
                assert {"app/seed", "app/team/one", "ops/seed", "ops/other"} <= set(paths)
            else:
                assert [p for p in paths if p in ("app/seed", "app/team/one", "ops/seed",
                                                  "ops/other")] == want, (who, paths)
                assert not [p for p in paths if p.startswith("ops/")], (who, paths)
        finally:
            channel.close()


def test_workload_through_pilot(agent: DevAgent, server: Nexus, agent_ca_dir: Path) -> None:
    demo = agent.env("workload")
    got = pilot_json(["secret", "get", "app/seed", "--output", "json"], demo, server)
    assert got["data"] == {"k": "v"}
    denied = pilot(["secret", "get", "ops/seed"], demo, server)
    assert denied.returncode == 4 and "permission denied" in denied.stderr
    assert pilot(["policy", "list"], demo, server).returncode == 4
    # A PEM-file identity works the same way.
    ca = CertificateAuthority.load(agent_ca_dir)
    leaf = ca.issue_svid(READER)
    env = pem_env(short_tmpdir("pem-"), leaf.cert_chain_pem(), leaf.key_pem(), ca.bundle_pem())
    assert pilot(["secret", "get", "app/seed"], env, server).returncode == 0
    assert pilot(["secret", "put", "app/seed", "k=w"], env, server).returncode == 4
    assert pilot(["secret", "list", "--output", "json"], env, server).stdout.strip() == \
        '{"paths": []}'


def test_policy_change_takes_effect_at_once(agent: DevAgent, server: Nexus) -> None:
    su, demo = agent.env("pilot"), agent.env("workload")
    assert pilot(["secret", "get", "ops/other"], demo, server).returncode == 4
    pilot_json(["policy", "put", "demo-ops", "--spiffe-id-pattern",
                r"spiffe://spike\.internal/workload/demo", "--path-pattern", "ops/other",
                "--permissions", "super", "--output", "json"], su, server)
    assert pilot(["secret", "get", "ops/other"], demo, server).returncode == 0
    assert pilot(["secret", "get", "ops/seed"], demo, server).returncode == 4  # full match
    pilot(["policy", "delete", "demo-ops"], su, server)
    assert pilot(["secret", "get", "ops/other"], demo, server).returncode == 4


# ---------------------------------------------------------------- policy CRUD via Pilot


def test_policy_crud_and_json_shapes(agent: DevAgent, server: Nexus, tmp_path: Path) -> None:
    su = agent.env("pilot")
    put = pilot_json(["policy", "put", "crud", "--spiffe-id-pattern", "spiffe://a/.*",
                      "--path-pattern", "x/.*", "--permissions", "read, list",
                      "--output", "json"], su, server)
    assert put == {"name": "crud", "spiffe_id_pattern": "spiffe://a/.*",
                   "path_pattern": "x/.*", "permissions": ["list", "read"]}
    assert pilot_json(["policy", "get", "crud", "--output", "json"], su, server) == put
    listed = pilot(["policy", "list", "--output", "json"], su, server)
    names = [p["name"] for p in json.loads(listed.stdout)["policies"]]
    assert "crud" in names and "demo-rw" in names
    assert pilot_json(["policy", "delete", "crud", "--output", "json"], su, server) == {
        "name": "crud", "deleted": True}
    assert pilot(["policy", "get", "crud"], su, server).returncode == 6
    assert pilot(["policy", "delete", "crud"], su, server).returncode == 6

    src = tmp_path / "policies.json"
    src.write_text(json.dumps([
        {"name": "ap1", "spiffe_id_pattern": "spiffe://a/b", "path_pattern": "p1/.*",
         "permissions": ["read"]},
        {"name": "ap2", "spiffe_id_pattern": "spiffe://a/c", "path_pattern": "p2/.*",
         "permissions": "read,write"},
    ]))
    applied = pilot(["policy", "apply", "--file", str(src), "--output", "json"], su, server)
    assert applied.returncode == 0, applied.stderr
    assert [json.loads(x)["name"] for x in applied.stdout.splitlines()] == ["ap1", "ap2"]
    assert pilot_json(["policy", "get", "ap2", "--output", "json"], su, server)[
        "permissions"] == ["read", "write"]
    for name in ("ap1", "ap2"):
        pilot(["policy", "delete", name], su, server)


@pytest.mark.parametrize(("args", "words"), [
    (["--spiffe-id-pattern", r"(a)\1", "--path-pattern", "x"], "not a valid RE2"),
    (["--spiffe-id-pattern", "spiffe://a/b", "--path-pattern", "(?=a)a"], "not a valid RE2"),
    (["--spiffe-id-pattern", "spiffe://a/b", "--path-pattern", "(?<!a)b"], "not a valid RE2"),
    (["--spiffe-id-pattern", "spiffe://a/b", "--path-pattern", "(?!a).*"], "not a valid RE2"),
    (["--spiffe-id-pattern", "spiffe://a/b", "--path-pattern", "(unclosed"], "not a valid RE2"),
    (["--spiffe-id-pattern", "", "--path-pattern", "x"], "empty"),
    (["--spiffe-id-pattern", "a", "--path-pattern", "x" * 1025], "longer than 1024"),
])
def test_invalid_patterns_are_refused(agent: DevAgent, server: Nexus, args: list[str],
                                      words: str) -> None:
    result = pilot(["policy", "put", "bad-re", *args, "--permissions", "read"],
                   agent.env("pilot"), server)
    assert result.returncode == 2, result.stderr
    assert words in result.stderr, result.stderr


def test_invalid_policy_names_and_permissions(agent: DevAgent, server: Nexus) -> None:
    su = agent.env("pilot")
    base = ["--spiffe-id-pattern", "a", "--path-pattern", "b"]
    assert pilot(["policy", "put", "bad name", *base, "--permissions", "read"],
                 su, server).returncode == 2
    assert pilot(["policy", "put", "ok", *base, "--permissions", "read,fly"],
                 su, server).returncode == 2
    # Straight to the server: an unknown permission value is refused there too.
    channel = client_channel(server.address, fetch_svid(agent.socket("pilot")), TLS_NAME)
    try:
        stub = policies_pb2_grpc.PoliciesStub(channel)
        unknown = policies_pb2.Permission.ValueType(99)
        for perms in ([], [policies_pb2.PERMISSION_UNSPECIFIED], [unknown]):
            policy = policies_pb2.Policy(name="raw", spiffe_id_pattern="a", path_pattern="b",
                                         permissions=perms)
            code = code_of(partial(stub.Put, policies_pb2.PutPolicyRequest(policy=policy),
                                   timeout=10))
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (perms, code)
    finally:
        channel.close()


# ---------------------------------------------------------------- hostile expressions

HOSTILE = ["(a+)+$", "(a+)+", "(x*)*y", "(a|aa)*b", "(a|a?)+c", "((a+)+/?)+b", "(.*a){12}"]


def engine_with(policies: list[Policy]) -> PolicyEngine:
    """A PolicyEngine whose cache holds these policies (the decisions are the real code)."""
    engine = PolicyEngine(store=None, keys=None, superuser_id=SU,  # type: ignore[arg-type]
                          counter=None, cache_seconds=1e9)  # type: ignore[arg-type]
    engine._cache = (time.monotonic(), [
        _Compiled(p, compile_pattern(p.spiffe_id_pattern, "SPIFFE ID"),
                  compile_pattern(p.path_pattern, "path")) for p in policies])
    return engine


@pytest.mark.parametrize("pattern", HOSTILE)
def test_hostile_regex_is_linear_in_process(pattern: str) -> None:
    policies = [Policy("h", pattern, pattern, frozenset({"read"})),
                Policy("h2", "spiffe://.*", pattern, frozenset({"read"})),
                Policy("h3", pattern, ".*", frozenset({"read"}))]
    engine = engine_with(policies)
    hostile_path = "a" * 100_000 + "!"
    hostile_caller = "spiffe://" + "a" * 100_000 + "!"
    worst = 0.0
    for caller, path in ((hostile_caller, hostile_path), ("spiffe://td/w", hostile_path),
                         (hostile_caller, "x")):
        began = time.perf_counter()
        assert engine.allowed(caller, path, "read") is False
        worst = max(worst, time.perf_counter() - began)
    assert worst < 0.5, f"{pattern}: {worst:.3f} s"
    # The engine still decides positively when the expression does match.
    began = time.perf_counter()
    assert engine.allowed("spiffe://" + "a" * 1000, "a" * 100_000, "read") is (
        pattern not in ("(x*)*y", "(a|aa)*b", "(a|a?)+c", "((a+)+/?)+b"))
    assert time.perf_counter() - began < 0.5


def test_hostile_regex_through_the_server(agent: DevAgent, server: Nexus,
                                          identities: dict[str, SvidMaterial]) -> None:
    su = agent.env("pilot")
    pilot_json(["policy", "put", "hostile-deny", "--spiffe-id-pattern", "(s|p|i|f|e|:|/|.)+(x*)*y",
                "--path-pattern", "((a+)+/?)+b", "--permissions", "read", "--output", "json"],
               su, server)
    pilot_json(["policy", "put", "hostile-allow", "--spiffe-id-pattern",
                r"spiffe://spike\.internal/workload/(d|e|m|o|de|mo)+",
                "--path-pattern", "(a+)+(/(a+)+)*", "--permissions", "read",
                "--output", "json"], su, server)
    long_path = "/".join(["a" * 127] * 4)  # 511 characters, the longest valid shape
    pilot_json(["secret", "put", long_path, "k=deep", "--output", "json"], su, server)
    near_miss = "/".join(["a" * 127] * 3 + ["a" * 126 + "c"])
    pilot_json(["secret", "put", near_miss, "k=miss", "--output", "json"], su, server)

    channel = client_channel(server.address, identities["demo"], TLS_NAME)
    try:
        stub = secrets_pb2_grpc.SecretsStub(channel)
        began = time.perf_counter()
        got = stub.Get(secrets_pb2.GetSecretRequest(path=long_path), timeout=10)
        allowed_s = time.perf_counter() - began
        assert dict(got.data) == {"k": "deep"}
        began = time.perf_counter()
        code = code_of(lambda: stub.Get(secrets_pb2.GetSecretRequest(path=near_miss),
                                        timeout=10))
        denied_s = time.perf_counter() - began
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert allowed_s < 1.0 and denied_s < 1.0, (allowed_s, denied_s)
    finally:
        channel.close()
    for name in ("hostile-deny", "hostile-allow"):
        pilot(["policy", "delete", name], su, server)


class CountingPattern:
    """A compiled pattern that counts its matches."""

    def __init__(self, pattern: str) -> None:
        self.pattern = compile_pattern(pattern, "test")
        self.calls = 0

    def fullmatch(self, text: str) -> Any:
        self.calls += 1
        return self.pattern.fullmatch(text)


def test_decisions_are_cached_only_while_the_policy_set_is_the_same() -> None:
    policy = Policy("app", "spiffe://td/app", "apps/.*", frozenset({"read"}))
    engine = engine_with([policy])
    ids, paths = CountingPattern("spiffe://td/app"), CountingPattern("apps/.*")
    engine._cache = (time.monotonic(), [_Compiled(policy, ids, paths)])
    for _ in range(5):
        assert engine.allowed("spiffe://td/app", "apps/db", "read")
        assert not engine.allowed("spiffe://td/app", "apps/db", "write")
        assert not engine.allowed("spiffe://td/other", "apps/db", "read")
    assert (ids.calls, paths.calls) == (2, 1)  # each decision evaluated once
    # The policy goes away (a new compiled set, as invalidate() + reload produce): the
    # remembered "allowed" must not survive it.
    engine._cache = (time.monotonic(), [])
    assert not engine.allowed("spiffe://td/app", "apps/db", "read")
    engine._cache = (time.monotonic(), [_Compiled(policy, ids, paths)])
    assert engine.allowed("spiffe://td/app", "apps/db", "read")
    # Bounded: in entries, and long keys are decided without being kept.
    for i in range(DECISION_CACHE_ENTRIES + 10):
        engine.allowed("spiffe://td/app", f"apps/{i}", "read")
    assert len(engine._decisions[1]) <= DECISION_CACHE_ENTRIES
    engine._cache = (time.monotonic(), [_Compiled(policy, ids, paths)])
    assert engine.allowed("spiffe://td/app", "apps/" + "x" * 5000, "read")
    assert engine._decisions[1] == {}
