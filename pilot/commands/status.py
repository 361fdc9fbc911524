"""spike status: the operator's single pane."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from pilot.output import enum_word, iso_time, render, text_table
from spike.states import ROTATION_PHASE_PREFIX, STATE_PREFIX, LifecycleState, RotationPhase

if TYPE_CHECKING:
    from pilot.client import NexusClient
    from pilot.commands import Subcommands
    from spike.v1.operator_pb2 import StatusResponse


def register(sub: Subcommands, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("status", parents=[parent], help="show Nexus state, key, backup, rotation")
    p.set_defaults(func=run)


def status_dict(resp: StatusResponse) -> dict[str, Any]:
    from spike.v1 import operator_pb2 as pb

    state = enum_word(LifecycleState, pb.State.Name(resp.state), STATE_PREFIX)
    backup = resp.backup
    rotation = resp.rotation
    return {
        "state": state,
        "root_key_generation": resp.root_key_generation,
        "root_key_fingerprint": resp.root_key_fingerprint,
        "root_key_created": iso_time(resp, "root_key_created"),
        "hardening": {
            "core_dumps_disabled": resp.hardening.core_dumps_disabled,
            "dumpable_off": resp.hardening.dumpable_off,
            # None (n/a) while no root key is in memory: there is nothing to lock yet.
            "key_memory_locked": (resp.hardening.key_memory_locked
                                  if resp.root_key_generation else None),
        },
        "backup": {
            "present": backup.present,
            "path": backup.path,
            "status": backup.status,
            "detail": backup.detail,
            "last_written": iso_time(backup, "last_written"),
            "last_verified": iso_time(backup, "last_verified"),
            "generations": list(backup.generations),
            "kdf": backup.kdf,
        },
        "rotation": {
            "id": rotation.rotation_id,
            "phase": enum_word(RotationPhase, pb.RotationPhase.Name(rotation.phase),
                               ROTATION_PHASE_PREFIX),
            "from_generation": rotation.from_generation,
            "to_generation": rotation.to_generation,
            "total": rotation.total,
            "done": rotation.done,
            "failed": rotation.failed,
        } if resp.HasField("rotation") else None,
        "next_rotation": iso_time(resp, "next_rotation"),
        "schedule_problem": resp.schedule.problem,
        "records_by_generation": {str(k): v for k, v in resp.records_by_generation.items()},
        "store": resp.store,
        "version": resp.version,
        "caller": resp.caller_spiffe_id,
        "node": resp.node,
        "nodes": [{
            "node": n.name,
            "address": n.address,
            "state": n.state,
            "root_key_generation": n.root_key_generation,
            "generations": list(n.generations),
            "last_seen": iso_time(n, "last_seen"),
            "live": n.live,
            "version": n.version,
        } for n in resp.nodes],
    }


def run(args: argparse.Namespace, client: NexusClient) -> int:
    from spike.v1 import operator_pb2 as pb

    stub = client.operator
    data = status_dict(client.call(stub.Status, pb.StatusRequest()))
    render(args, data, lambda: print(status_text(data)))
    return 0


def status_text(data: dict[str, Any]) -> str:
    h = data["hardening"]
    b = data["backup"]
    rows = [
        ("state", data["state"]),
        ("root key", f"generation {data['root_key_generation']}  "
                     f"fingerprint {data['root_key_fingerprint'] or '-'}"
         if data["root_key_generation"] else "-"),
        ("key created", data["root_key_created"] or "-"),
        ("hardening", f"core dumps off: {h['core_dumps_disabled']}, "
                      f"not dumpable: {h['dumpable_off']}, key memory locked: "
                      f"{_or_na(h['key_memory_locked'])}"),
        ("backup", f"{b['status']}  {b['path']}" + (f"  ({b['detail']})" if b["detail"] else "")),
        ("backup written", b["last_written"] or "-"),
        ("backup verified", b["last_verified"] or "-"),
        ("store", data["store"]),
        ("caller", data["caller"]),
    ]
    rot = data["rotation"]
    if rot:
        rows.append(("rotation", f"{rot['phase']} {rot['from_generation']}->"
                                 f"{rot['to_generation']} {rot['done']}/{rot['total']}"))
    if data["next_rotation"]:
        rows.append(("next rotation", data["next_rotation"]))
    if data["schedule_problem"]:
        rows.append(("schedule", data["schedule_problem"]))
    if len(data["nodes"]) > 1:  # one node: nothing more to say than the rows above
        rows += [("node" if i == 0 else "", _node_line(n, data["node"]))
                 for i, n in enumerate(data["nodes"])]
    return text_table(rows)


def _node_line(n: dict[str, Any], this: str) -> str:
    gone = "" if n["live"] else "  (not reporting)"
    mine = "  (this node)" if n["node"] == this else ""
    return (f"{n['node']}  {n['address']}  {n['state']}  generation "
            f"{n['root_key_generation']}  last seen {n['last_seen'] or '-'}{gone}{mine}")


def _or_na(value: object) -> str:
    return "n/a (no key in memory)" if value is None else str(value)
