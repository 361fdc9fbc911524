"""spike policy put|get|list|delete|apply."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pilot.errors import UsageError
from pilot.output import enum_word, info, render
from spike.permissions import PERMISSION_PREFIX, PERMISSIONS, Permission
from spike.states import proto_name

if TYPE_CHECKING:
    from pilot.client import NexusClient
    from pilot.commands import Subcommands
    from spike.v1.policies_pb2 import Policy


def register(sub: Subcommands, parent: argparse.ArgumentParser) -> None:
    policy = sub.add_parser("policy", parents=[parent], help="manage access policies")
    psub = policy.add_subparsers(dest="policy_command", metavar="COMMAND", required=True)

    p = psub.add_parser("put", parents=[parent], help="create or replace a policy",
                        description="Patterns are RE2 expressions matched against the whole "
                        "SPIFFE ID / path (anchored).")
    p.add_argument("name", help="the policy's name")
    p.add_argument("--spiffe-id-pattern", required=True, metavar="RE",
                   help="RE2 pattern the caller's SPIFFE ID must match in full (required)")
    p.add_argument("--path-pattern", required=True, metavar="RE",
                   help="RE2 pattern the secret path must match in full (required)")
    p.add_argument("--permissions", required=True, metavar="read,list,write,super",
                   help="comma-separated permissions granted (required)")
    p.set_defaults(func=run_put)

    p = psub.add_parser("get", parents=[parent], help="show one policy")
    p.add_argument("name", help="the policy's name")
    p.set_defaults(func=run_get)

    p = psub.add_parser("list", parents=[parent], help="list policies")
    p.set_defaults(func=run_list)

    p = psub.add_parser("delete", parents=[parent], help="delete a policy")
    p.add_argument("name", help="the policy's name")
    p.set_defaults(func=run_delete)

    p = psub.add_parser("apply", parents=[parent],
                        help="create or replace policies from a JSON file (one object per "
                        "line, or a JSON array)")
    p.add_argument("--file", type=Path, required=True, metavar="F",
                   help="JSON lines or a JSON array of policies (required)")
    p.set_defaults(func=run_apply)


def parse_permissions(text: str | list[str]) -> list[str]:
    items = text if isinstance(text, list) else [p.strip() for p in text.split(",")]
    items = [p for p in items if p]
    bad = [p for p in items if p not in PERMISSIONS]
    if bad or not items:
        raise UsageError(f"permissions are a comma-separated subset of {','.join(PERMISSIONS)}")
    return items


def _message(name: str, spiffe: str, path: str, perms: list[str]) -> Policy:
    from spike.v1 import policies_pb2 as pb

    return pb.Policy(name=name, spiffe_id_pattern=spiffe, path_pattern=path,
                     permissions=[pb.Permission.Value(proto_name(Permission(p),
                                                                 PERMISSION_PREFIX))
                                  for p in perms])


def to_dict(msg: Policy) -> dict[str, Any]:
    from spike.v1 import policies_pb2 as pb

    return {
        "name": msg.name,
        "spiffe_id_pattern": msg.spiffe_id_pattern,
        "path_pattern": msg.path_pattern,
        "permissions": [enum_word(Permission, pb.Permission.Name(p), PERMISSION_PREFIX)
                        for p in msg.permissions],
    }


def _text(data: dict[str, Any]) -> str:
    return (f"{data['name']}: {','.join(data['permissions'])}  "
            f"spiffe_id=~{data['spiffe_id_pattern']}"
            f"  path=~{data['path_pattern']}")


def _show(args: argparse.Namespace, data: dict[str, Any]) -> None:
    render(args, data, _text(data))


def run_put(args: argparse.Namespace, client: NexusClient) -> int:
    from spike.v1 import policies_pb2 as pb

    stub = client.policies
    msg = _message(args.name, args.spiffe_id_pattern, args.path_pattern,
                   parse_permissions(args.permissions))
    resp = client.call(stub.Put, pb.PutPolicyRequest(policy=msg))
    _show(args, to_dict(resp.policy))
    return 0


def run_get(args: argparse.Namespace, client: NexusClient) -> int:
    from spike.v1 import policies_pb2 as pb

    stub = client.policies
    _show(args, to_dict(client.call(stub.Get, pb.GetPolicyRequest(name=args.name))))
    return 0


def run_list(args: argparse.Namespace, client: NexusClient) -> int:
    from spike.v1 import policies_pb2 as pb

    stub = client.policies
    resp = client.call(stub.List, pb.ListPoliciesRequest())
    policies = [to_dict(policy) for policy in resp.policies]

    def text() -> None:  # one line per policy
        for data in policies:
            print(_text(data))
        if not policies:
            info("no policies")

    render(args, {"policies": policies}, text)
    return 0


def run_delete(args: argparse.Namespace, client: NexusClient) -> int:
    from spike.v1 import policies_pb2 as pb

    stub = client.policies
    client.call(stub.Delete, pb.DeletePolicyRequest(name=args.name))
    render(args, {"name": args.name, "deleted": True}, f"deleted policy {args.name}")
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


def run_apply(args: argparse.Namespace, client: NexusClient) -> int:
    from spike.v1 import policies_pb2 as pb

    stub = client.policies
    docs = _load(args.file)
    for doc in docs:
        msg = _message(doc["name"], doc["spiffe_id_pattern"], doc["path_pattern"],
                       parse_permissions(doc["permissions"]))
        resp = client.call(stub.Put, pb.PutPolicyRequest(policy=msg))
        _show(args, to_dict(resp.policy))
    info(f"applied {len(docs)} polic{'y' if len(docs) == 1 else 'ies'}")
    return 0
