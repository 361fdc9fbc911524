"""spike policy put|get|list|delete|apply."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from pilot.errors import UsageError
from pilot.output import emit_json, info

PERMISSIONS = ("read", "write", "list", "super")


def register(sub: Any, parent: argparse.ArgumentParser) -> None:
    policy = sub.add_parser("policy", parents=[parent], help="manage access policies")
    psub = policy.add_subparsers(dest="policy_command", metavar="COMMAND", required=True)

    p = psub.add_parser("put", parents=[parent], help="create or replace a policy",
                        description="Patterns are RE2 expressions matched against the whole "
                        "SPIFFE ID / path (anchored).")
    p.add_argument("name")
    p.add_argument("--spiffe-id-pattern", required=True, metavar="RE")
    p.add_argument("--path-pattern", required=True, metavar="RE")
    p.add_argument("--permissions", required=True, metavar="read,list,write,super")
    p.set_defaults(func=run_put)

    p = psub.add_parser("get", parents=[parent], help="show one policy")
    p.add_argument("name")
    p.set_defaults(func=run_get)

    p = psub.add_parser("list", parents=[parent], help="list policies")
    p.set_defaults(func=run_list)

    p = psub.add_parser("delete", parents=[parent], help="delete a policy")
    p.add_argument("name")
    p.set_defaults(func=run_delete)

    p = psub.add_parser("apply", parents=[parent],
                        help="create or replace policies from a JSON file (one object per "
                        "line, or a JSON array)")
    p.add_argument("--file", type=Path, required=True, metavar="F")
    p.set_defaults(func=run_apply)


def _stub(client: Any) -> tuple[Any, Any]:
    from spike.v1 import policies_pb2 as pb
    from spike.v1 import policies_pb2_grpc as pb_grpc

    return pb, client.stub(pb_grpc.PoliciesStub)


def parse_permissions(text: str | list[str]) -> list[str]:
    items = text if isinstance(text, list) else [p.strip() for p in text.split(",")]
    items = [p for p in items if p]
    bad = [p for p in items if p not in PERMISSIONS]
    if bad or not items:
        raise UsageError(f"permissions are a comma-separated subset of {','.join(PERMISSIONS)}")
    return items


def _message(pb: Any, name: str, spiffe: str, path: str, perms: list[str]) -> Any:
    return pb.Policy(name=name, spiffe_id_pattern=spiffe, path_pattern=path,
                     permissions=[pb.Permission.Value("PERMISSION_" + p.upper())
                                  for p in perms])


def to_dict(pb: Any, msg: Any) -> dict[str, Any]:
    return {
        "name": msg.name,
        "spiffe_id_pattern": msg.spiffe_id_pattern,
        "path_pattern": msg.path_pattern,
        "permissions": [pb.Permission.Name(p).removeprefix("PERMISSION_").lower()
                        for p in msg.permissions],
    }


def _show(args: argparse.Namespace, data: dict[str, Any]) -> None:
    if args.output == "json":
        emit_json(data)
    else:
        print(f"{data['name']}: {','.join(data['permissions'])}  "
              f"spiffe_id=~{data['spiffe_id_pattern']}"
              f"  path=~{data['path_pattern']}")


def run_put(args: argparse.Namespace, client: Any) -> int:
    pb, stub = _stub(client)
    msg = _message(pb, args.name, args.spiffe_id_pattern, args.path_pattern,
                   parse_permissions(args.permissions))
    resp = client.call(stub.Put, pb.PutPolicyRequest(policy=msg))
    _show(args, to_dict(pb, resp.policy))
    return 0


def run_get(args: argparse.Namespace, client: Any) -> int:
    pb, stub = _stub(client)
    _show(args, to_dict(pb, client.call(stub.Get, pb.GetPolicyRequest(name=args.name))))
    return 0


def run_list(args: argparse.Namespace, client: Any) -> int:
    pb, stub = _stub(client)
    resp = client.call(stub.List, pb.ListPoliciesRequest())
    if args.output == "json":
        emit_json({"policies": [to_dict(pb, policy) for policy in resp.policies]})
        return 0
    for policy in resp.policies:
        _show(args, to_dict(pb, policy))
    if not resp.policies:
        info("no policies")
    return 0


def run_delete(args: argparse.Namespace, client: Any) -> int:
    pb, stub = _stub(client)
    client.call(stub.Delete, pb.DeletePolicyRequest(name=args.name))
    if args.output == "json":
        emit_json({"name": args.name, "deleted": True})
    else:
        print(f"deleted policy {args.name}")
    return 0


def _load(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    try:
        if text.lstrip().startswith("["):
            docs = json.loads(text)
        else:
            docs = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path}: invalid JSON at line {exc.lineno}") from None
    for doc in docs:
        if not isinstance(doc, dict) or not {"name", "spiffe_id_pattern", "path_pattern",
                                              "permissions"} <= set(doc):
            raise UsageError(f"{path}: each policy needs name, spiffe_id_pattern, "
                             "path_pattern and permissions")
    return list(docs)


def run_apply(args: argparse.Namespace, client: Any) -> int:
    pb, stub = _stub(client)
    docs = _load(args.file)
    for doc in docs:
        msg = _message(pb, doc["name"], doc["spiffe_id_pattern"], doc["path_pattern"],
                       parse_permissions(doc["permissions"]))
        resp = client.call(stub.Put, pb.PutPolicyRequest(policy=msg))
        _show(args, to_dict(pb, resp.policy))
    info(f"applied {len(docs)} polic{'y' if len(docs) == 1 else 'ies'}")
    return 0
