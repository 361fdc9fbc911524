"""Secrets.List in bounded pages (issue 11, item 6) against a real Nexus on SQLite.

Before paging, one workload that wrote 12,000 paths made every `spike secret list` fail with
"larger than max" (the reply passed the 4 MiB message limit), the superuser's too. Now a page
is bounded by count and by bytes, the token is opaque and bound to the caller and the prefix,
hidden paths never leak (not even through the token), and Pilot follows the pages.
"""

from __future__ import annotations

import base64
import shutil
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest

from spike.identity import fetch_svid
from spike.tls import MAX_MESSAGE_BYTES, client_channel
from spike.v1 import policies_pb2, policies_pb2_grpc, secrets_pb2, secrets_pb2_grpc
from tests.harness import TEST_PASSWORD, DevAgent, Nexus, pilot, pilot_json, short_tmpdir

TLS_NAME = "nexus.spike.internal"
WORKLOAD = "spiffe://spike.internal/workload/demo"
BULK = 12_000
# 12,000 paths of this length are ~4.6 MB of paths: past the 4 MiB message limit.
FILL = "/" + "a" * 120 + "/" + "b" * 120 + "/" + "c" * 120


def bulk_path(i: int) -> str:
    return f"bulk/{i:05d}{FILL}"


@pytest.fixture(scope="module")
def server(agent: DevAgent) -> Iterator[Nexus]:
    data_dir = short_tmpdir("nxl-")
    running = Nexus(data_dir, agent.env("nexus"))
    result = pilot(["init", "--password-stdin"], agent.env("pilot"), running,
                   stdin=TEST_PASSWORD + "\n")
    assert result.returncode == 0, result.stderr
    yield running
    running.stop()
    shutil.rmtree(data_dir, ignore_errors=True)


class Client:
    """A raw gRPC client (one channel) for one identity of the dev agent."""

    def __init__(self, agent: DevAgent, server: Nexus, who: str) -> None:
        self.channel = client_channel(server.address, fetch_svid(agent.socket(who)), TLS_NAME)
        self.secrets = secrets_pb2_grpc.SecretsStub(self.channel)
        self.policies = policies_pb2_grpc.PoliciesStub(self.channel)

    def put(self, path: str) -> None:
        self.secrets.Put(secrets_pb2.PutSecretRequest(path=path, data={"k": "v"}), timeout=60)

    def page(self, prefix: str = "", size: int = 0, token: str = "") -> Any:
        return self.secrets.List(secrets_pb2.ListSecretsRequest(
            prefix=prefix, page_size=size, page_token=token), timeout=60)

    def all_pages(self, prefix: str = "", size: int = 0) -> list[Any]:
        pages = [self.page(prefix, size)]
        while pages[-1].next_page_token:
            pages.append(self.page(prefix, size, pages[-1].next_page_token))
            assert len(pages) < 10_000
        return pages

    def close(self) -> None:
        self.channel.close()


@pytest.fixture(scope="module")
def su(agent: DevAgent, server: Nexus) -> Iterator[Client]:
    client = Client(agent, server, "pilot")
    yield client
    client.close()


@pytest.fixture(scope="module")
def workload(agent: DevAgent, server: Nexus) -> Iterator[Client]:
    client = Client(agent, server, "workload")
    yield client
    client.close()


def put_many(client: Client, paths: list[str]) -> None:
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(client.put, paths))


def allow(su: Client, name: str, path_pattern: str, permissions: list[str]) -> None:
    codes = {"read": policies_pb2.PERMISSION_READ, "write": policies_pb2.PERMISSION_WRITE,
             "list": policies_pb2.PERMISSION_LIST}
    su.policies.Put(policies_pb2.PutPolicyRequest(policy=policies_pb2.Policy(
        name=name, spiffe_id_pattern=WORKLOAD.replace(".", "\\."),
        path_pattern=path_pattern, permissions=[codes[p] for p in permissions])), timeout=30)


def paths_of(pages: list[Any]) -> list[str]:
    return [p for page in pages for p in page.paths]


# ------------------------------------------------------------------ the regression


def test_spike_secret_list_of_12000_long_paths(agent: DevAgent, server: Nexus, su: Client,
                                               workload: Client) -> None:
    """12,000 paths written by one workload: `spike secret list` lists them all, for the
    superuser and for the workload, in text and JSON (the same shape as before)."""
    allow(su, "bulk-writer", "bulk/.*", ["read", "write", "list"])
    expected = [bulk_path(i) for i in range(BULK)]
    assert sum(len(p) + 3 for p in expected) > MAX_MESSAGE_BYTES
    put_many(workload, expected)

    for who in ("pilot", "workload"):
        listed = pilot(["secret", "list", "bulk/", "--output", "json"], agent.env(who),
                       server, timeout=300)
        assert listed.returncode == 0, (who, listed.stderr[-2000:])
        assert set(__import__("json").loads(listed.stdout)) == {"paths"}
        assert pilot_json(["secret", "list", "bulk/", "--output", "json"], agent.env(who),
                          server, timeout=300)["paths"] == expected
        text = pilot(["secret", "list", "bulk/"], agent.env(who), server, timeout=300)
        assert text.returncode == 0, text.stderr[-2000:]
        assert text.stdout.splitlines() == expected

    # Over raw gRPC: several pages, each within the count and byte bounds.
    pages = su.all_pages("bulk/", size=5000)
    assert paths_of(pages) == expected
    assert len(pages) >= 5
    for page in pages:
        assert len(page.paths) <= 5000
        assert page.ByteSize() <= 1024 * 1024 + 4096


# ------------------------------------------------------------------ page size and bytes


def test_page_size_default_and_maximum(su: Client) -> None:
    paths = [f"sizes/{i:04d}" for i in range(1203)]
    put_many(su, paths)
    first = su.page("sizes/")
    assert list(first.paths) == paths[:1000]  # the default
    assert first.next_page_token
    rest = su.page("sizes/", token=first.next_page_token)
    assert list(rest.paths) == paths[1000:] and not rest.next_page_token

    assert paths_of(su.all_pages("sizes/", size=7)) == paths
    assert all(len(p.paths) <= 7 for p in su.all_pages("sizes/", size=7))
    assert [len(p.paths) for p in su.all_pages("sizes/", size=1_000_000)] == [1203]
    small = su.all_pages("sizes/", size=1)
    assert [len(p.paths) for p in small] == [1] * 1203


def test_a_page_of_long_paths_is_bounded_by_bytes(su: Client) -> None:
    long_path = "long/" + "/".join(["x" * 127] * 4)[:500]
    paths = [f"{long_path}{i:05d}" for i in range(2500)]
    assert all(len(p) <= 512 for p in paths)
    put_many(su, paths)
    pages = su.all_pages("long/", size=5000)
    assert paths_of(pages) == paths
    assert len(pages) >= 2  # 2,500 * ~510 bytes > 1 MiB
    assert all(page.ByteSize() <= 1024 * 1024 + 4096 for page in pages)


# ------------------------------------------------------------------ tokens


def test_tampered_or_foreign_tokens_are_invalid_argument(su: Client,
                                                         workload: Client) -> None:
    put_many(su, [f"tok/{i}" for i in range(10)])
    token = su.page("tok/", size=3).next_page_token
    assert token
    raw = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    raw[len(raw) // 2] ^= 1
    flipped = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
    allow(su, "tok-lister", "tok/.*", ["list"])
    for bad, client, prefix in (
        (flipped, su, "tok/"),
        (token[:-2], su, "tok/"),
        (token + "A", su, "tok/"),
        ("not a token!", su, "tok/"),
        ("x" * 5000, su, "tok/"),
        ("x" * 20_000, su, "tok/"),
        (token, su, "to"),  # another prefix
        (token, workload, "tok/"),  # another caller
    ):
        with pytest.raises(grpc.RpcError) as info:
            client.page(prefix, size=3, token=bad)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
        assert "invalid page token" in (info.value.details() or "")
        assert bad not in (info.value.details() or "")
    # The genuine token still works.
    assert list(su.page("tok/", size=3, token=token).paths) == ["tok/3", "tok/4", "tok/5"]


def test_writes_between_pages_neither_repeat_nor_skip(su: Client) -> None:
    put_many(su, [f"live/{i:03d}" for i in range(0, 100, 2)])  # the even ones
    first = su.page("live/", size=10)
    assert list(first.paths) == [f"live/{i:03d}" for i in range(0, 20, 2)]
    # Odd paths appear before and after the cursor while the listing runs.
    put_many(su, [f"live/{i:03d}" for i in range(1, 100, 2)])
    rest: list[str] = []
    token = first.next_page_token
    while token:
        page = su.page("live/", size=10, token=token)
        rest.extend(page.paths)
        token = page.next_page_token
    listed = list(first.paths) + rest
    assert len(listed) == len(set(listed))
    assert listed == sorted(listed)
    # Every path that existed throughout is listed once; those added behind the cursor
    # are not, those added ahead of it are.
    assert set(f"live/{i:03d}" for i in range(0, 100, 2)) <= set(listed)
    assert set(f"live/{i:03d}" for i in range(21, 100, 2)) <= set(listed)
    assert not set(f"live/{i:03d}" for i in range(1, 19, 2)) & set(listed)


# ------------------------------------------------------------------ policy filtering


def test_hidden_paths_never_leak_and_hidden_pages_continue(su: Client,
                                                           workload: Client) -> None:
    hidden = [f"mix/h{i:05d}-topsecretname" for i in range(2_500)]
    visible = ["mix/a-visible", "mix/zz-visible"]
    put_many(su, visible + hidden)
    allow(su, "mix-lister", r"mix/.*-visible", ["list"])

    pages = workload.all_pages("mix/", size=100)
    assert paths_of(pages) == visible
    # 2,500 hidden paths between the two visible ones: a page of 100 looks at no more than
    # 1,000 paths, so some pages are entirely filtered, and they still carry a token.
    assert any(not page.paths and page.next_page_token for page in pages)
    assert not pages[-1].next_page_token
    for page in pages:
        if page.next_page_token:
            raw = base64.urlsafe_b64decode(page.next_page_token
                                           + "=" * (-len(page.next_page_token) % 4))
            assert b"topsecretname" not in raw and b"mix/" not in raw
    # The superuser sees everything.
    assert paths_of(su.all_pages("mix/", size=5000)) == sorted(visible + hidden)


def test_pilot_follows_pages_and_keeps_output_shapes(agent: DevAgent, server: Nexus,
                                                     su: Client) -> None:
    put_many(su, [f"shape/{i}" for i in range(3)])
    out = pilot_json(["secret", "list", "shape/", "--output", "json"], agent.env("pilot"),
                     server)
    assert out == {"paths": ["shape/0", "shape/1", "shape/2"]}
    empty = pilot(["secret", "list", "nothing-here/", "--output", "json"], agent.env("pilot"),
                  server)
    assert empty.returncode == 0 and empty.stdout.strip() == '{"paths": []}'


def test_concurrent_listings_are_independent(su: Client) -> None:
    put_many(su, [f"par/{i:04d}" for i in range(300)])
    results: list[list[str]] = []
    lock = threading.Lock()

    def lister() -> None:
        got = paths_of(su.all_pages("par/", size=17))
        with lock:
            results.append(got)

    threads = [threading.Thread(target=lister) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == [[f"par/{i:04d}" for i in range(300)]] * 4
