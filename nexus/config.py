"""Nexus configuration: defaults < TOML file < SPIKE_NEXUS_* environment < flags."""

from __future__ import annotations

import argparse
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import Field, dataclass, field, fields
from pathlib import Path
from typing import Any

from spike.errors import ConfigError
from spike.roles import nexus_id
from spike.tls import DEFAULT_TLS_NAME, DEFAULT_TRUST_DOMAIN
from spike.version import VERSION

ENV_PREFIX = "SPIKE_NEXUS_"


@dataclass
class NexusConfig:
    listen: str = "127.0.0.1:8553"
    data_dir: Path = field(default_factory=lambda: Path("./spike-data"))
    backup_file: Path | None = None
    store: str = "sqlite"
    dsn: str = ""
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    tls_name: str = DEFAULT_TLS_NAME
    metrics_listen: str = ""
    audit_file: str = ""  # "" = DATA_DIR/audit.jsonl; "-" = stderr
    svid_cert: Path | None = None
    svid_key: Path | None = None
    trust_bundle: Path | None = None
    log_level: str = "info"
    # Bounds how long a connection may keep an old (even expired) SVID.
    max_connection_age_seconds: float = 300.0
    # How long a call may still run on a connection closed by age before it is cut.
    max_connection_age_grace_seconds: float = 30.0
    # Argon2id parameters for new backups (RFC 9106 second recommendation).
    kdf_time_cost: int = 3
    kdf_memory_kib: int = 65536
    kdf_parallelism: int = 4
    # Tests only: allow Argon2id parameters below the OWASP minimum.
    insecure_test_kdf: bool = False
    # One-time upgrade: accept (and tag) generation records written before records were
    # authenticated, at the next recover with the password.
    authenticate_legacy_records: bool = False
    backup_verify_interval_seconds: float = 3600.0
    # First delay after a wrong password; doubles per failure (capped at 300 s).
    recover_backoff_seconds: float = 1.0
    # How often the rotation scheduler checks whether a rotation is due; 0 turns the
    # scheduler off on this node (with several nodes, let one node schedule).
    scheduler_check_seconds: float = 60.0
    # Names this node in rotation ownership (default: hostname:data-dir).
    node_name: str = ""
    # Where the other nodes reach this one (default: the listen address as bound).
    advertise_address: str = ""
    # A node silent this long counts as gone; a rotation's finalize waits at most this long
    # for the other nodes to report the new generation.
    node_lease_seconds: float = 10.0
    max_secret_versions: int = 10
    max_value_bytes: int = 64 * 1024
    workers: int = 32
    # A connection that has not finished its TLS handshake by then is closed.
    handshake_timeout_seconds: float = 10.0
    # Open connections Nexus accepts at once; 0 = derived from the file descriptor limit.
    max_connections: int = 0
    # Concurrent streams (calls) per connection.
    max_concurrent_streams: int = 100
    # SQLite: concurrent puts share one commit (one fsync); off = one commit per put.
    group_commit: bool = True

    @property
    def backup_path(self) -> Path:
        return self.backup_file or self.data_dir / "root-key.backup"

    @property
    def sqlite_path(self) -> Path:
        return self.data_dir / "spike.db"

    @property
    def audit_target(self) -> str:
        return self.audit_file or str(self.data_dir / "audit.jsonl")

    @property
    def nexus_spiffe_id(self) -> str:
        return nexus_id(self.trust_domain)


_TYPES = {f.name: f for f in fields(NexusConfig)}
# Test-only switches: never from the environment or a file, where they could linger
# unnoticed in a production deployment.
FLAG_ONLY = frozenset({"insecure_test_kdf", "authenticate_legacy_records"})


def _has_field_type(raw: Any, default: Any) -> bool:
    if isinstance(default, bool) or isinstance(raw, bool):
        return isinstance(default, bool) and isinstance(raw, bool)
    if isinstance(default, int):
        return isinstance(raw, int)
    if isinstance(default, float):
        return isinstance(raw, int | float)
    return False  # strings and paths


def _coerce(name: str, raw: Any) -> Any:
    default = getattr(NexusConfig(), name)
    kind = _TYPES[name].type
    # Flags and the environment give strings; TOML gives typed values, which must already have
    # the field's type: 2.5 or true for an int, or 8553 for a string, is refused, not truncated.
    if not isinstance(raw, str) and not _has_field_type(raw, default):
        raise ConfigError(f"invalid value for {name}: {raw!r}")
    try:
        if "Path" in str(kind):
            return Path(str(raw)) if raw not in ("", None) else default
        if isinstance(default, bool):
            if isinstance(raw, bool):
                return raw
            word = raw.strip().lower()
            if word not in {"1", "true", "yes", "on", "0", "false", "no", "off", ""}:
                raise ValueError(raw)
            return word in {"1", "true", "yes", "on"}
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"invalid value for {name}: {raw!r}") from None
    return str(raw)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spike-nexus",
        description="SPIKE Nexus: the secrets store server. Every flag also reads "
        "SPIKE_NEXUS_<FLAG> from the environment (e.g. SPIKE_NEXUS_LISTEN), and a TOML "
        "file given with --config may set the same keys. Precedence: flags, environment, "
        "file, defaults.",
        epilog=EPILOG,
    )
    parser.add_argument("--config", metavar="FILE",
                        help="TOML file with the same keys as the flags (default: "
                        "SPIKE_NEXUS_CONFIG, else none)")
    parser.add_argument("--version", action="version", version=f"spike-nexus {VERSION}",
                        help="print the version and exit")
    for f in fields(NexusConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "insecure_test_kdf":
            parser.add_argument(flag, action="store_const", const=True, default=None,
                                help=argparse.SUPPRESS)
            continue
        if f.name == "authenticate_legacy_records":
            parser.add_argument(
                flag, action="store_const", const=True, default=None,
                help="one-time upgrade of a store from before authenticated generation "
                     "records: the next recover with the password accepts and tags them "
                     "(only if nobody else could have written the store and the backup) "
                     "(default: off)")
            continue
        metavar, text = _help(f)
        parser.add_argument(flag, default=None, metavar=metavar, help=text)
    return parser


# Per flag: its metavar and what it does; the default is added from NexusConfig (or, where
# the default is derived at start, from _DEFAULT_SHOWN).
_HELP: dict[str, tuple[str, str]] = {
    "listen": ("HOST:PORT", "address to serve gRPC on (mutual TLS only)"),
    "data_dir": ("DIR", "directory for the backup, the SQLite store and the audit trail"),
    "backup_file": ("PATH", "encrypted root key backup"),
    "store": ("sqlite|postgres", "store backend: sqlite (embedded) or postgres"),
    "dsn": ("DSN", "PostgreSQL connection string (with --store postgres)"),
    "trust_domain": ("TD", "our SPIFFE trust domain"),
    "tls_name": ("NAME", "DNS SAN that Nexus's SVID must carry; Pilot pins it"),
    "metrics_listen": ("HOST:PORT", "address for Prometheus metrics"),
    "audit_file": ("PATH", "audit trail file; '-' for stderr"),
    "svid_cert": ("PEM", "SVID certificate chain file, instead of the Workload API"),
    "svid_key": ("PEM", "PKCS#8 private key file of the SVID (with --svid-cert)"),
    "trust_bundle": ("PEM", "trust bundle file of our trust domain (with --svid-cert)"),
    "log_level": ("LEVEL", "debug, info, warning or error; JSON lines on stderr"),
    "max_connection_age_seconds": ("SECONDS", "close every connection after this long, so "
                                   "none keeps an old SVID"),
    "max_connection_age_grace_seconds": ("SECONDS", "how long calls may still run on a "
                                         "connection closed by age before it is cut"),
    "kdf_time_cost": ("T", "Argon2id passes for new backups (never below 2)"),
    "kdf_memory_kib": ("KIB", "Argon2id memory for new backups, in KiB (never below 19456)"),
    "kdf_parallelism": ("P", "Argon2id lanes for new backups"),
    "backup_verify_interval_seconds": ("SECONDS", "how often Nexus checks its backup file "
                                       "on its own"),
    "recover_backoff_seconds": ("SECONDS", "first delay after a wrong password; doubles per "
                                "failure, capped at 300 s"),
    "scheduler_check_seconds": ("SECONDS", "how often the rotation scheduler looks; 0 turns "
                                "it off on this node"),
    "node_name": ("NAME", "this node's name as the owner of a rotation (several nodes on "
                  "one store)"),
    "advertise_address": ("HOST:PORT", "where the other nodes sharing the store reach this "
                          "one; shown by spike status"),
    "node_lease_seconds": ("SECONDS", "a node silent this long counts as gone; a rotation "
                           "waits at most this long for the other nodes before it drops the "
                           "old key"),
    "max_secret_versions": ("N", "versions kept per secret; older ones are deleted for good"),
    "max_value_bytes": ("BYTES", "bound on a secret's keys and values together"),
    "workers": ("N", "gRPC worker threads (calls served at once)"),
    "handshake_timeout_seconds": ("SECONDS", "close a connection that has not completed its "
                                  "TLS handshake after this long"),
    "max_connections": ("N", "connections accepted at once; 0 = the open-file limit less a "
                        "reserve for the store, the audit trail and the backup"),
    "max_concurrent_streams": ("N", "concurrent calls per connection"),
    "group_commit": ("on|off", "SQLite: concurrent puts share one durable commit (one "
                     "fsync); off commits each put on its own"),
}
# Defaults that are derived at start, or that mean "off".
_DEFAULT_SHOWN = {
    "data_dir": "./spike-data",
    "backup_file": "DATA_DIR/root-key.backup",
    "dsn": "none",
    "metrics_listen": "off",
    "audit_file": "DATA_DIR/audit.jsonl",
    "svid_cert": "the Workload API",
    "svid_key": "none",
    "trust_bundle": "none",
    "node_name": "hostname:data-dir",
    "advertise_address": "the listen address",
    "group_commit": "on",
}
EPILOG = ("example: spike-nexus --listen 0.0.0.0:8553 --data-dir /var/lib/spike-nexus "
          "--metrics-listen 127.0.0.1:9553")


def _help(f: Field[Any]) -> tuple[str, str]:
    """The flag's metavar and help text, ending with its default."""
    metavar, text = _HELP[f.name]
    shown = _DEFAULT_SHOWN.get(f.name)
    if shown is None:
        default = f.default
        shown = str(int(default)) if isinstance(default, float) and default.is_integer() \
            else str(default)
    # '%' would be read as a format by argparse.
    return metavar, f"{text} (default: {shown})".replace("%", "%%")


def load_config(
    argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
) -> NexusConfig:
    env = os.environ if env is None else env
    args = build_parser().parse_args(argv)
    values: dict[str, Any] = {}
    config_file = args.config or env.get(ENV_PREFIX + "CONFIG")
    if config_file:
        try:
            with open(config_file, "rb") as fh:
                data = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {config_file}: {exc}") from None
        for key, raw in data.items():
            name = key.replace("-", "_")
            if name not in _TYPES or name in FLAG_ONLY:
                raise ConfigError(f"unknown key in {config_file}: {key}")
            values[name] = _coerce(name, raw)
    for name in _TYPES:
        raw = env.get(ENV_PREFIX + name.upper())
        if raw is not None:
            if name in FLAG_ONLY:
                raise ConfigError(f"{ENV_PREFIX}{name.upper()} is not accepted: the test-only "
                                  "switch exists only as a command-line flag")
            values[name] = _coerce(name, raw)
    for name in _TYPES:
        raw = getattr(args, name)
        if raw is not None:
            values[name] = _coerce(name, raw)
    config = NexusConfig(**values)
    validate(config)
    return config


def validate(config: NexusConfig) -> None:
    if config.store not in {"sqlite", "postgres"}:
        raise ConfigError(f"--store must be sqlite or postgres, got {config.store!r}")
    if config.store == "postgres" and not config.dsn:
        raise ConfigError("--store postgres needs --dsn (or SPIKE_NEXUS_DSN)")
    pem = [config.svid_cert, config.svid_key, config.trust_bundle]
    if any(pem) and not all(pem):
        raise ConfigError("--svid-cert, --svid-key and --trust-bundle go together")
    for flag, address in (("--listen", config.listen),
                          ("--advertise-address", config.advertise_address)):
        host, _, port = address.rpartition(":")
        bad = not host or not port.isdigit() or int(port) > 65535
        if (address or flag == "--listen") and bad:
            raise ConfigError(f"{flag} must be HOST:PORT, got {address!r}")
    if config.node_lease_seconds < 4:
        raise ConfigError("node_lease_seconds must be at least 4 (two heartbeats)")
    if config.max_secret_versions < 1:
        raise ConfigError("max_secret_versions must be at least 1")
    if not 0.1 <= config.handshake_timeout_seconds <= 300:
        raise ConfigError("handshake_timeout_seconds must be between 0.1 and 300")
    if config.max_connection_age_grace_seconds < 0:
        raise ConfigError("max_connection_age_grace_seconds must be 0 or positive")
    if config.max_connections < 0:
        raise ConfigError("max_connections must be 0 (derived) or positive")
    if not 1 <= config.max_concurrent_streams <= 10_000:
        raise ConfigError("max_concurrent_streams must be between 1 and 10000")
