"""spike status: the operator's single pane."""

from __future__ import annotations

import argparse
from typing import Any

from pilot.output import emit_json, iso_time, text_table


def register(sub: Any, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("status", parents=[parent], help="show Nexus state, key, backup, rotation")
    p.set_defaults(func=run)


def status_dict(resp: Any) -> dict[str, Any]:
    from spike.v1 import operator_pb2 as pb

    state = pb.State.Name(resp.state).removeprefix("STATE_").lower()
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
            "key_memory_locked": resp.hardening.key_memory_locked,
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
            "phase": pb.RotationPhase.Name(rotation.phase).removeprefix("ROTATION_PHASE_").lower(),
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
    }


def run(args: argparse.Namespace, client: Any) -> int:
    from spike.v1 import operator_pb2 as pb
    from spike.v1 import operator_pb2_grpc as pb_grpc

    stub = client.stub(pb_grpc.OperatorStub)
    data = status_dict(client.call(stub.Status, pb.StatusRequest()))
    if args.output == "json":
        emit_json(data)
        return 0
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
                      f"{h['key_memory_locked']}"),
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
    print(text_table(rows))
    return 0
