"""spike init | recover | backup status/verify/export | password change."""

from __future__ import annotations

import argparse
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pilot.errors import PasswordOrBackup, UsageError
from pilot.output import info, render
from pilot.passwords import add_password_options, read_new_password, read_password
from spike.memory import wipe_bytearray as wipe

if TYPE_CHECKING:
    from pilot.client import NexusClient
    from pilot.commands import Subcommands


def register(sub: Subcommands, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("init", parents=[parent],
                       help="first start: set the admin password; Nexus generates the root key")
    add_password_options(p)
    p.set_defaults(func=run_init)

    p = sub.add_parser("recover", parents=[parent],
                       help="after a restart: unseal from the backup with the password")
    p.add_argument("--backup-file", type=Path, metavar="F",
                   help="an exported backup, when the server's own file is lost (default: "
                        "the server's own backup file)")
    p.add_argument("--accept-old-password", action="store_true",
                   help="recover even from a backup sealed under an earlier password (made "
                        "before a password change): the server's backup is then sealed under "
                        "that old password again; run `spike password change` afterwards (default: "
                        "off)")
    add_password_options(p)
    p.set_defaults(func=run_recover)

    backup = sub.add_parser("backup", parents=[parent], help="the encrypted root key backup")
    bsub = backup.add_subparsers(dest="backup_command", metavar="COMMAND", required=True)
    p = bsub.add_parser("status", parents=[parent], help="backup file state and last checks")
    p.set_defaults(func=run_backup_status)
    p = bsub.add_parser("verify", parents=[parent],
                        help="prove the password opens the backup and it matches memory")
    add_password_options(p)
    p.set_defaults(func=run_backup_verify)
    p = bsub.add_parser("export", parents=[parent], help="write the encrypted backup to F")
    p.add_argument("--out", type=Path, required=True, metavar="F",
                   help="file to write, mode 0600 (required)")
    p.add_argument("--force", action="store_true",
                   help="overwrite F if it exists (default: off, refuse)")
    p.set_defaults(func=run_backup_export)

    password = sub.add_parser("password", parents=[parent], help="the administrator password")
    psub = password.add_subparsers(dest="password_command", metavar="COMMAND", required=True)
    p = psub.add_parser("change", parents=[parent],
                        help="re-seal every live generation under a new password")
    add_password_options(p, new=True)
    p.set_defaults(func=run_password_change)


# Argon2id with production parameters takes a while on the server.
SLOW = 120.0


def run_init(args: argparse.Namespace, client: NexusClient) -> int:
    from spike.v1 import operator_pb2 as pb

    stub = client.operator
    password = read_password(args, "New administrator password", confirm=True)
    try:
        resp = client.call(stub.Init, pb.InitRequest(password=bytes(password)),
                           timeout=SLOW)
    finally:
        wipe(password)
    data = {"root_key_generation": resp.root_key_generation,
            "root_key_fingerprint": resp.root_key_fingerprint,
            "backup_path": resp.backup_path, "state": "unsealed"}

    def text() -> None:
        print(f"initialized: root key generation {resp.root_key_generation}, "
              f"fingerprint {resp.root_key_fingerprint}")
        print(f"encrypted backup written to {resp.backup_path} on the Nexus host")
        info("keep the password safe: without it the backup cannot be opened, and "
             "`spike backup export --out F` gives you an off-host copy")

    render(args, data, text)
    return 0


def run_recover(args: argparse.Namespace, client: NexusClient) -> int:
    from spike.v1 import operator_pb2 as pb

    stub = client.operator
    exported = b""
    if args.backup_file:
        try:
            exported = args.backup_file.read_bytes()
        except OSError as exc:
            raise UsageError(f"cannot read {args.backup_file}: {exc.strerror}") from None
        if not exported:
            raise UsageError(f"{args.backup_file} is empty")
    password = read_password(args, "Administrator password")
    try:
        resp = client.call(stub.Recover, pb.RecoverRequest(
            password=bytes(password), backup=exported,
            accept_old_password=args.accept_old_password), timeout=SLOW)
    finally:
        wipe(password)
    data = {"state": "unsealed", "root_key_generation": resp.root_key_generation,
            "root_key_fingerprint": resp.root_key_fingerprint,
            "generations": list(resp.generations),
            "old_password_accepted": resp.old_password_accepted,
            "retired_generations": list(resp.retired_generations)}
    render(args, data, f"unsealed: root key generation {resp.root_key_generation}, fingerprint "
                       f"{resp.root_key_fingerprint}, generations in memory "
                       f"{list(resp.generations)}")
    # On stderr in both output modes: what the operator should know or do next.
    if resp.retired_generations:
        info(f"ignored retired generation(s) {list(resp.retired_generations)} held by this "
             "backup (this Nexus retired them after a rotation; no record needs them)")
    if resp.old_password_accepted:
        info("this backup is sealed under an earlier password, and so is the server's backup "
             "now: run `spike password change` (old -> current password)")
    return 0


def run_backup_status(args: argparse.Namespace, client: NexusClient) -> int:
    from pilot.commands.status import status_dict
    from spike.v1 import operator_pb2 as pb

    stub = client.operator
    resp = client.call(stub.BackupStatus, pb.BackupStatusRequest())
    wrapper = pb.StatusResponse(backup=resp.backup)
    data: dict[str, Any] = status_dict(wrapper)["backup"]
    render(args, data, "\n".join(
        f"{key:14} {data[key] if data[key] not in (None, '', []) else '-'}"
        for key in ("status", "path", "detail", "generations", "kdf", "last_written",
                    "last_verified")))
    return 0 if data["status"] == "ok" else 1


def run_backup_verify(args: argparse.Namespace, client: NexusClient) -> int:
    from spike.v1 import operator_pb2 as pb

    stub = client.operator
    password = read_password(args, "Administrator password")
    try:
        resp = client.call(stub.BackupVerify,
                           pb.BackupVerifyRequest(password=bytes(password)), timeout=SLOW)
    finally:
        wipe(password)
    render(args, {"ok": resp.ok, "generations": list(resp.generations), "detail": resp.detail},
           f"backup verified: {resp.detail} (generations {list(resp.generations)})")
    return 0 if resp.ok else PasswordOrBackup.exit_code


def run_backup_export(args: argparse.Namespace, client: NexusClient) -> int:
    from spike.v1 import operator_pb2 as pb

    stub = client.operator
    if args.out.exists() and not args.force:
        raise UsageError(f"{args.out} exists: choose another file or pass --force")
    resp = client.call(stub.BackupExport, pb.BackupExportRequest())
    # A fresh, exclusive temp name (no symlink following, no pre-created file to
    # inherit an owner from), then an atomic rename.
    tmp = args.out.with_name(f".{args.out.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(resp.backup)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, args.out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    render(args, {"out": str(args.out), "bytes": len(resp.backup),
                  "generations": list(resp.generations)},
           f"encrypted backup ({len(resp.backup)} bytes, generations "
           f"{list(resp.generations)}) written to {args.out}")
    return 0


def run_password_change(args: argparse.Namespace, client: NexusClient) -> int:
    from spike.v1 import operator_pb2 as pb

    stub = client.operator
    old = read_password(args, "Current password")
    new = bytearray()
    try:
        new = read_new_password(args)
        resp = client.call(stub.ChangePassword, pb.ChangePasswordRequest(
            old_password=bytes(old), new_password=bytes(new)), timeout=SLOW)
    finally:
        wipe(old)
        wipe(new)
    render(args, {"ok": True, "generations": list(resp.generations)},
           f"password changed; backup re-sealed (generations {list(resp.generations)})")
    return 0
