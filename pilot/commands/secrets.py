"""spike secret put|get|list|delete|undelete|destroy|metadata|import."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pilot.errors import PilotError, UsageError
from pilot.output import info, iso_time, render

if TYPE_CHECKING:
    from pilot.client import NexusClient
    from pilot.commands import Subcommands


def register(sub: Subcommands, parent: argparse.ArgumentParser) -> None:
    secret = sub.add_parser("secret", parents=[parent], help="read and write secrets")
    ssub = secret.add_subparsers(dest="secret_command", metavar="COMMAND", required=True)

    p = ssub.add_parser("put", parents=[parent], help="write a new version of a secret",
                        description="VALUE may be @FILE to read it from a file, or - to read "
                        "it from stdin: values given inline are visible to other local users "
                        "in the process list and in shell history. An @FILE value loses exactly "
                        "one trailing newline, if it has one (printf 'x' > F and echo x > F give "
                        "the same value); a value from stdin is taken as it is.")
    p.add_argument("path", help="the secret's path, e.g. apps/db")
    p.add_argument("pairs", nargs="+", metavar="KEY=VALUE",
                   help="VALUE inline, @FILE or - (stdin)")
    p.add_argument("--cas", type=int, metavar="N",
                   help="write only if the current version is N (0: only if new) (default: "
                        "write whatever the current version)")
    p.set_defaults(func=run_put)

    p = ssub.add_parser("get", parents=[parent], help="read a secret")
    p.add_argument("path", help="the secret's path")
    p.add_argument("--version", type=int, default=0, metavar="N",
                   help="the version to read; 0 = the current one (default: %(default)s)")
    p.add_argument("--field", metavar="KEY",
                   help="print only this key's value (default: every key)")
    p.set_defaults(func=run_get)

    p = ssub.add_parser("list", parents=[parent], help="list secret paths you may list")
    p.add_argument("prefix", nargs="?", default="",
                   help="only paths that start with it (default: every path)")
    p.set_defaults(func=run_list)

    for name, helptext, required in (
        ("delete", "soft-delete versions (default: the current one)", False),
        ("undelete", "restore soft-deleted versions", True),
        ("destroy", "permanently destroy versions", True),
    ):
        p = ssub.add_parser(name, parents=[parent], help=helptext)
        p.add_argument("path", help="the secret's path")
        p.add_argument("--version", type=int, action="append", dest="versions",
                       required=required, metavar="N",
                       help="a version, repeatable " + ("(required)" if required else
                                                        "(default: the current one)"))
        p.set_defaults(func=run_versions, action=name)

    p = ssub.add_parser("metadata", parents=[parent], help="versions and times of a secret")
    p.add_argument("path", help="the secret's path")
    p.set_defaults(func=run_metadata)

    p = ssub.add_parser("import", parents=[parent],
                        help='bulk load: one JSON object per line {"path":...,"data":{...}}')
    p.add_argument("--file", type=Path, required=True, metavar="F",
                   help="JSON lines to load; '-' for stdin (required)")
    p.add_argument("--skip-existing", action="store_true",
                   help="skip a line whose path already holds a secret (check-and-set 0): "
                        "makes a re-run after an interruption safe (default: write a new "
                        "version)")
    p.add_argument("--batch-size", type=int, default=1000, metavar="N",
                   help="lines per batch, each batch one durable commit (default: "
                        "%(default)s)")
    p.set_defaults(func=run_import)


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
            value = read_value_file(key, value[1:])
        if key in data:
            raise UsageError(f"key {key!r} given twice")
        data[key] = value
    return data


def read_value_file(key: str, name: str) -> str:
    """The file's text less exactly one trailing newline (what ``echo`` or an editor adds)."""
    try:
        value = Path(name).read_text()
    except OSError as exc:
        raise UsageError(f"cannot read value file for {key}: {exc.strerror}") from None
    return value.removesuffix("\n")


def run_put(args: argparse.Namespace, client: NexusClient) -> int:
    from spike.v1 import secrets_pb2 as pb

    stub = client.secrets
    request = pb.PutSecretRequest(path=args.path, data=parse_pairs(args.pairs))
    if args.cas is not None:
        if args.cas < 0:
            raise UsageError("--cas must be >= 0")
        request.cas = args.cas
    resp = client.call(stub.Put, request)
    render(args, {"path": resp.path, "version": resp.version},
           f"wrote {resp.path} version {resp.version}")
    return 0


def run_get(args: argparse.Namespace, client: NexusClient) -> int:
    from spike.v1 import secrets_pb2 as pb

    stub = client.secrets
    resp = client.call(stub.Get,
                       pb.GetSecretRequest(path=args.path, version=args.version))
    data = dict(resp.data)
    if args.field is not None:
        if args.field not in data:
            raise PilotError(f"{resp.path} version {resp.version} has no key {args.field!r}")
        value = data[args.field]
        # The exact value, newline only for a human at a terminal.
        render(args, {"path": resp.path, "version": resp.version, "data": {args.field: value}},
               lambda: sys.stdout.write(value + ("\n" if sys.stdout.isatty() else "")))
        return 0

    def text() -> None:
        info(f"{resp.path} (version {resp.version})")
        for key in sorted(data):
            print(f"{key}={data[key]}")

    render(args, {"path": resp.path, "version": resp.version, "data": data}, text)
    return 0


def list_paths(client: NexusClient, prefix: str) -> Iterator[str]:
    """Every path under ``prefix`` the caller may list, in order, following the pages."""
    from spike.v1 import secrets_pb2 as pb

    stub = client.secrets
    token = ""
    last: bytes | None = None
    while True:
        resp = client.call(stub.List,
                           pb.ListSecretsRequest(prefix=prefix, page_token=token))
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


def run_list(args: argparse.Namespace, client: NexusClient) -> int:
    def text() -> None:  # as the pages come
        for path in list_paths(client, args.prefix):
            print(path)

    render(args, lambda: {"paths": list(list_paths(client, args.prefix))}, text)
    return 0


def run_versions(args: argparse.Namespace, client: NexusClient) -> int:
    from spike.v1 import secrets_pb2 as pb

    versions = args.versions or []
    stub = client.secrets
    if args.action == "delete":
        client.call(stub.Delete, pb.DeleteSecretRequest(path=args.path, versions=versions))
    elif args.action == "undelete":
        client.call(stub.Undelete, pb.UndeleteSecretRequest(path=args.path, versions=versions))
    else:
        client.call(stub.Destroy, pb.DestroySecretRequest(path=args.path, versions=versions))
    label = {"delete": "deleted", "undelete": "undeleted", "destroy": "destroyed"}[args.action]
    render(args, {"path": args.path, "versions": versions, "result": label},
           f"{label} {args.path} " + (f"versions {versions}" if versions else "current version"))
    return 0


def run_metadata(args: argparse.Namespace, client: NexusClient) -> int:
    from spike.v1 import secrets_pb2 as pb

    stub = client.secrets
    resp = client.call(stub.Metadata, pb.SecretMetadataRequest(path=args.path))
    data: dict[str, Any] = {
        "path": resp.path,
        "current_version": resp.current_version,
        "oldest_version": resp.oldest_version,
        "created": iso_time(resp, "created"),
        "updated": iso_time(resp, "updated"),
        "versions": [{"version": v.version, "created": iso_time(v, "created"),
                      "deleted": iso_time(v, "deleted"), "destroyed": v.destroyed}
                     for v in resp.versions],
    }
    lines = [f"{data['path']}: current version {data['current_version']}, oldest "
             f"{data['oldest_version']}, updated {data['updated']}"]
    for v in data["versions"]:
        state = "destroyed" if v["destroyed"] else ("deleted" if v["deleted"] else "live")
        lines.append(f"  v{v['version']}  {v['created']}  {state}")
    render(args, data, "\n".join(lines))
    return 0


def run_import(args: argparse.Namespace, client: NexusClient) -> int:
    from pilot.commands.importing import MAX_BATCH, import_file, summary
    from pilot.output import json_mode

    if not 1 <= args.batch_size <= MAX_BATCH:
        raise UsageError(f"--batch-size must be between 1 and {MAX_BATCH}")
    try:
        stream = sys.stdin if str(args.file) == "-" else args.file.open(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read {args.file}: {exc.strerror}") from None
    bar = not json_mode(args) and sys.stderr.isatty()
    with stream:
        tally = import_file(client, stream, batch_size=args.batch_size,
                            skip_existing=args.skip_existing, bar=bar)
    skipped = f", {tally.skipped} skipped (already there)" if args.skip_existing else ""
    render(args, summary(tally, args.skip_existing),
           lambda: info(f"imported {tally.imported} secret(s), {tally.failed} failed{skipped}"))
    return 0 if tally.failed == 0 else 1
