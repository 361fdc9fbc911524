"""spike secret put|get|list|delete|undelete|destroy|metadata|import."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pilot.errors import PilotError, UsageError
from pilot.output import emit_json, info, iso_time


def register(sub: Any, parent: argparse.ArgumentParser) -> None:
    secret = sub.add_parser("secret", parents=[parent], help="read and write secrets")
    ssub = secret.add_subparsers(dest="secret_command", metavar="COMMAND", required=True)

    p = ssub.add_parser("put", parents=[parent], help="write a new version of a secret",
                        description="VALUE may be @FILE to read it from a file, or - to read "
                        "it from stdin: values given inline are visible to other local users "
                        "in the process list and in shell history.")
    p.add_argument("path")
    p.add_argument("pairs", nargs="+", metavar="KEY=VALUE")
    p.add_argument("--cas", type=int, metavar="N",
                   help="write only if the current version is N (0: only if new)")
    p.set_defaults(func=run_put)

    p = ssub.add_parser("get", parents=[parent], help="read a secret")
    p.add_argument("path")
    p.add_argument("--version", type=int, default=0, metavar="N")
    p.add_argument("--field", metavar="KEY", help="print only this key's value")
    p.set_defaults(func=run_get)

    p = ssub.add_parser("list", parents=[parent], help="list secret paths you may list")
    p.add_argument("prefix", nargs="?", default="")
    p.set_defaults(func=run_list)

    for name, helptext, required in (
        ("delete", "soft-delete versions (default: the current one)", False),
        ("undelete", "restore soft-deleted versions", True),
        ("destroy", "permanently destroy versions", True),
    ):
        p = ssub.add_parser(name, parents=[parent], help=helptext)
        p.add_argument("path")
        p.add_argument("--version", type=int, action="append", dest="versions",
                       required=required, metavar="N", help="repeatable")
        p.set_defaults(func=run_versions, action=name)

    p = ssub.add_parser("metadata", parents=[parent], help="versions and times of a secret")
    p.add_argument("path")
    p.set_defaults(func=run_metadata)

    p = ssub.add_parser("import", parents=[parent],
                        help='bulk load: one JSON object per line {"path":...,"data":{...}}')
    p.add_argument("--file", type=Path, required=True, metavar="F", help="'-' for stdin")
    p.set_defaults(func=run_import)


def _stub(client: Any) -> tuple[Any, Any]:
    from spike.v1 import secrets_pb2 as pb
    from spike.v1 import secrets_pb2_grpc as pb_grpc

    return pb, client.stub(pb_grpc.SecretsStub)


def parse_pairs(pairs: list[str]) -> dict[str, str]:
    data: dict[str, str] = {}
    stdin_used = False
    for number, pair in enumerate(pairs, start=1):
        key, sep, value = pair.partition("=")
        if not sep or not key:
            # Not echoed: a mistyped argument may well be the secret value itself.
            raise UsageError(f"argument {number} after the path is not KEY=VALUE")
        if value == "-":
            if stdin_used:
                raise UsageError("only one value can come from stdin")
            stdin_used = True
            value = sys.stdin.read()
        elif value.startswith("@"):
            try:
                value = Path(value[1:]).read_text()
            except OSError as exc:
                raise UsageError(f"cannot read value file for {key}: {exc.strerror}") from None
        if key in data:
            raise UsageError(f"key {key!r} given twice")
        data[key] = value
    return data


def run_put(args: argparse.Namespace, client: Any) -> int:
    pb, stub = _stub(client)
    request = pb.PutSecretRequest(path=args.path, data=parse_pairs(args.pairs))
    if args.cas is not None:
        if args.cas < 0:
            raise UsageError("--cas must be >= 0")
        request.cas = args.cas
    resp = client.call(stub.Put, request)
    if args.output == "json":
        emit_json({"path": resp.path, "version": resp.version})
    else:
        print(f"wrote {resp.path} version {resp.version}")
    return 0


def run_get(args: argparse.Namespace, client: Any) -> int:
    pb, stub = _stub(client)
    resp = client.call(stub.Get, pb.GetSecretRequest(path=args.path, version=args.version))
    data = dict(resp.data)
    if args.field is not None:
        if args.field not in data:
            raise PilotError(f"{resp.path} version {resp.version} has no key {args.field!r}")
        if args.output == "json":
            emit_json({"path": resp.path, "version": resp.version,
                       "data": {args.field: data[args.field]}})
        else:
            # The exact value, newline only for a human at a terminal.
            sys.stdout.write(data[args.field] + ("\n" if sys.stdout.isatty() else ""))
        return 0
    if args.output == "json":
        emit_json({"path": resp.path, "version": resp.version, "data": data})
    else:
        info(f"{resp.path} (version {resp.version})")
        for key in sorted(data):
            print(f"{key}={data[key]}")
    return 0


def list_paths(client: Any, prefix: str) -> Iterator[str]:
    """Every path under ``prefix`` the caller may list, in order, following the pages."""
    pb, stub = _stub(client)
    token = ""
    last: bytes | None = None
    while True:
        resp = client.call(stub.List, pb.ListSecretsRequest(prefix=prefix, page_token=token))
        for path in resp.paths:
            key = path.encode()
            if last is not None and key <= last:
                # Pages come in path order; anything else would repeat or loop.
                raise PilotError("Nexus returned list pages out of order; the listing is "
                                 "incomplete")
            last = key
            yield path
        token = resp.next_page_token
        if not token:
            return


def run_list(args: argparse.Namespace, client: Any) -> int:
    if args.output == "json":
        emit_json({"paths": list(list_paths(client, args.prefix))})
    else:
        for path in list_paths(client, args.prefix):
            print(path)
    return 0


def run_versions(args: argparse.Namespace, client: Any) -> int:
    pb, stub = _stub(client)
    versions = args.versions or []
    if args.action == "delete":
        client.call(stub.Delete, pb.DeleteSecretRequest(path=args.path, versions=versions))
    elif args.action == "undelete":
        client.call(stub.Undelete, pb.UndeleteSecretRequest(path=args.path, versions=versions))
    else:
        client.call(stub.Destroy, pb.DestroySecretRequest(path=args.path, versions=versions))
    label = {"delete": "deleted", "undelete": "undeleted", "destroy": "destroyed"}[args.action]
    if args.output == "json":
        emit_json({"path": args.path, "versions": versions, "result": label})
    else:
        print(f"{label} {args.path} " + (f"versions {versions}" if versions else
                                         "current version"))
    return 0


def run_metadata(args: argparse.Namespace, client: Any) -> int:
    pb, stub = _stub(client)
    resp = client.call(stub.Metadata, pb.SecretMetadataRequest(path=args.path))
    data = {
        "path": resp.path,
        "current_version": resp.current_version,
        "oldest_version": resp.oldest_version,
        "created": iso_time(resp, "created"),
        "updated": iso_time(resp, "updated"),
        "versions": [{"version": v.version, "created": iso_time(v, "created"),
                      "deleted": iso_time(v, "deleted"), "destroyed": v.destroyed}
                     for v in resp.versions],
    }
    if args.output == "json":
        emit_json(data)
    else:
        print(f"{data['path']}: current version {data['current_version']}, oldest "
              f"{data['oldest_version']}, updated {data['updated']}")
        for v in data["versions"]:
            state = "destroyed" if v["destroyed"] else ("deleted" if v["deleted"] else "live")
            print(f"  v{v['version']}  {v['created']}  {state}")
    return 0


def run_import(args: argparse.Namespace, client: Any) -> int:
    pb, stub = _stub(client)
    try:
        stream = sys.stdin if str(args.file) == "-" else args.file.open(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read {args.file}: {exc.strerror}") from None
    ok = failed = 0
    with stream:
        for number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
                path, data = doc["path"], doc["data"]
                if not isinstance(path, str) or not isinstance(data, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in data.items()
                ):
                    raise TypeError
            except (json.JSONDecodeError, KeyError, TypeError):
                failed += 1
                info(f"line {number}: expected {{\"path\": str, \"data\": {{str: str}}}}")
                continue
            try:
                client.call(stub.Put, pb.PutSecretRequest(path=path, data=data))
                ok += 1
            except PilotError as exc:
                if exc.exit_code == 3:
                    raise
                failed += 1
                info(f"line {number}: {path}: {exc}")
    summary = {"imported": ok, "failed": failed}
    if args.output == "json":
        emit_json(summary)
    else:
        info(f"imported {ok} secret(s), {failed} failed")
    return 0 if failed == 0 else 1
