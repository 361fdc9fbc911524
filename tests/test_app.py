"""nexus/app.py: the one builder of a Nexus, in process (no gRPC server without an identity)."""

from __future__ import annotations

from pathlib import Path

from nexus.app import build
from tests.harness import SUPERUSER, TEST_PASSWORD, nexus_config


def test_build_wires_one_object_graph_and_close_seals(tmp: Path) -> None:
    app = build(nexus_config(tmp, metrics_listen="127.0.0.1:0"))
    try:
        assert app.server is None and app.metrics is None  # nothing to serve as
        node = app.node
        assert (node.store, node.keys, node.audit) == (app.store, app.keys, app.audit)
        assert app.secrets is node.secrets and app.policies is node.policies
        assert app.rotation is node.rotation and app.scheduler is node.scheduler
        assert app.counter is node.counter
        app.keys.init(TEST_PASSWORD.encode())
        assert app.secrets.put(SUPERUSER, "app/db", {"k": "v"}, None) == 1
        assert app.secrets.get(SUPERUSER, "app/db", 1).data == {"k": "v"}
    finally:
        app.close()
    assert not app.keys.is_unsealed()
    assert (tmp / "audit.jsonl").exists() and (tmp / "root-key.backup").exists()


def test_a_rebuilt_nexus_recovers_what_the_first_one_wrote(tmp: Path) -> None:
    first = build(nexus_config(tmp))
    first.keys.init(TEST_PASSWORD.encode())
    first.secrets.put(SUPERUSER, "app/db", {"k": "v"}, None)
    first.close()
    again = build(nexus_config(tmp))
    try:
        again.keys.recover(TEST_PASSWORD.encode())
        assert again.secrets.get(SUPERUSER, "app/db", 1).data == {"k": "v"}
    finally:
        again.close()
