"""spike-dev-agent: a development-only SPIFFE Workload API agent.

Usage: ``spike-dev-agent --dir DIR [--trust-domain TD] [--ttl SECONDS] [--identity NAME=ID ...]``

Serves the SPIFFE Workload API on ``DIR/NAME.sock`` for each identity, writes the CA
certificate to ``DIR/bundle.pem`` and prints ``ready DIR`` on stdout once every socket exists.
Exits 0 on SIGTERM/SIGINT (sockets removed), 2 on bad arguments, 1 on runtime failures.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

import structlog
from structlog.typing import FilteringBoundLogger

from devagent.ca import (
    DEFAULT_BACKDATE,
    DEFAULT_CA_TTL,
    CAError,
    CertificateAuthority,
    validate_spiffe_id,
    validate_trust_domain,
)
from devagent.workload_api import AgentServers, Identity, SocketInUseError, SvidStore
from spike.roles import nexus_id, recover_id, superuser_id
from spike.version import VERSION

DEFAULT_TRUST_DOMAIN = "spike.internal"
DEFAULT_NEXUS_DNS = "nexus.spike.internal"
DEFAULT_TTL_SECONDS = 3600
MIN_TTL_SECONDS = 2
BUNDLE_FILE = "bundle.pem"
# sockaddr_un.sun_path is 108 bytes on Linux (104 on BSD/macOS), including the NUL.
MAX_SOCKET_PATH = 103

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_DNS_LABEL_RE = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")

WARNING_BANNER = """\
************************************************************************
*  DEVELOPMENT ONLY - never use spike-dev-agent in production.         *
*  It has no workload attestation: anyone who can open a socket gets   *
*  that identity. Its CA key lives in memory or in a plain file.       *
*  Use a real SPIFFE implementation (e.g. SPIRE) for anything real.    *
************************************************************************"""

EPILOG = """\
identities:
  Default sockets (TD = trust domain):
    nexus.sock     spiffe://TD/spike/nexus (+ DNS SAN from --nexus-dns)
    pilot.sock     spiffe://TD/spike/pilot/role/superuser
    recover.sock   spiffe://TD/spike/pilot/role/recover
    workload.sock  spiffe://TD/workload/demo
  --identity NAME=SPIFFE_ID[,dns=DNSNAME]...  adds DIR/NAME.sock, or replaces the
  identity of that NAME entirely (so `--identity nexus=...` needs its own dns=).
  The ID must be in the trust domain. Example:
    --identity web=spiffe://spike.internal/web,dns=web.local

files:
  DIR/NAME.sock   Workload API, one per identity (mode 0600; DIR is made 0700)
  DIR/bundle.pem  the CA certificate (trust bundle), written at start, removed at exit
  On readiness the agent prints one line `ready DIR` on stdout.

DEVELOPMENT ONLY: there is no workload attestation; the socket is the identity.
"""


class UsageError(Exception):
    """Bad command-line input (exit status 2)."""


def _dns_name(value: str) -> str:
    name = value.rstrip(".").lower()
    if not name or len(name) > 253 or not all(_DNS_LABEL_RE.match(p) for p in name.split(".")):
        raise UsageError(f"invalid DNS name {value!r}")
    return name


def _ttl(value: str) -> int:
    try:
        ttl = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from None
    if ttl < MIN_TTL_SECONDS:
        raise argparse.ArgumentTypeError(f"must be at least {MIN_TTL_SECONDS} seconds")
    return ttl


def parse_identity(spec: str, trust_domain: str) -> Identity:
    """Parse ``NAME=SPIFFE_ID[,dns=NAME]...``."""
    name, sep, rest = spec.partition("=")
    if not sep or not rest:
        raise UsageError(f"--identity {spec!r}: expected NAME=SPIFFE_ID[,dns=DNSNAME]")
    if not _NAME_RE.match(name):
        raise UsageError(
            f"--identity {spec!r}: NAME must be letters, digits, '.', '_' or '-' "
            "(at most 63, not starting with a punctuation character)"
        )
    spiffe_id, *options = rest.split(",")
    dns: list[str] = []
    for opt in options:
        key, eq, val = opt.partition("=")
        if key.strip() != "dns" or not eq:
            raise UsageError(f"--identity {spec!r}: unknown option {opt!r} (only dns=NAME)")
        dns.append(_dns_name(val.strip()))
    try:
        validate_spiffe_id(spiffe_id.strip(), trust_domain)
    except CAError as err:
        raise UsageError(f"--identity {spec!r}: {err}") from err
    return Identity(name=name, spiffe_id=spiffe_id.strip(), dns_names=tuple(dns))


def default_identities(trust_domain: str, nexus_dns: Sequence[str]) -> list[Identity]:
    td = trust_domain
    return [
        Identity("nexus", nexus_id(td), tuple(nexus_dns)),
        Identity("pilot", superuser_id(td)),
        Identity("recover", recover_id(td)),
        Identity("workload", f"spiffe://{td}/workload/demo"),
    ]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="spike-dev-agent",
        description="DEVELOPMENT ONLY SPIFFE Workload API agent: a local CA and one unix "
        "socket per identity, serving short-lived X.509-SVIDs that are re-issued before "
        "they expire.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"spike-dev-agent {VERSION}",
                   help="print the version and exit")
    p.add_argument("--dir", required=True, metavar="DIR", help="directory for the sockets")
    p.add_argument(
        "--trust-domain",
        default=DEFAULT_TRUST_DOMAIN,
        metavar="TD",
        help=f"trust domain (default: {DEFAULT_TRUST_DOMAIN})",
    )
    p.add_argument(
        "--ttl",
        type=_ttl,
        default=DEFAULT_TTL_SECONDS,
        metavar="SECONDS",
        help=f"X.509-SVID lifetime; re-issued at half of it (default: {DEFAULT_TTL_SECONDS})",
    )
    p.add_argument(
        "--identity",
        action="append",
        default=[],
        metavar="NAME=SPIFFE_ID[,dns=DNSNAME]",
        help="add DIR/NAME.sock serving SPIFFE_ID, or replace the identity NAME "
        "(repeatable; optional extra DNS SANs with ,dns=DNSNAME)",
    )
    p.add_argument(
        "--nexus-dns",
        action="append",
        metavar="NAME",
        help=f"DNS SAN of the default nexus SVID (repeatable; default: {DEFAULT_NEXUS_DNS})",
    )
    p.add_argument(
        "--no-default-identities",
        action="store_true",
        help="serve only the identities given with --identity",
    )
    p.add_argument(
        "--ca-dir",
        metavar="DIR2",
        help="persist the CA key and certificate here (0600) and reuse them across "
        "restarts (default: a fresh in-memory CA)",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log level (JSON lines on stderr; default: info)",
    )
    return p


def configure_logging(level: str) -> None:
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


def resolve_identities(args: argparse.Namespace, trust_domain: str) -> list[Identity]:
    nexus_dns = [_dns_name(n) for n in (args.nexus_dns or [DEFAULT_NEXUS_DNS])]
    by_name: dict[str, Identity] = {}
    if not args.no_default_identities:
        by_name = {i.name: i for i in default_identities(trust_domain, nexus_dns)}
    for spec in args.identity:
        ident = parse_identity(spec, trust_domain)
        by_name[ident.name] = ident
    if not by_name:
        raise UsageError("no identities to serve (--no-default-identities without --identity)")
    return list(by_name.values())


def _prepare_dir(directory: Path, names: Sequence[str]) -> None:
    for name in names:
        path = directory / f"{name}.sock"
        if len(os.fsencode(path)) > MAX_SOCKET_PATH:
            raise UsageError(
                f"socket path {str(path)!r} is too long for a unix socket "
                f"({len(os.fsencode(path))} > {MAX_SOCKET_PATH} bytes); use a shorter --dir"
            )
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
    except OSError as err:
        raise UsageError(f"--dir {str(directory)!r}: {err.strerror or err}") from err
    if not directory.is_dir():
        raise UsageError(f"--dir {str(directory)!r} is not a directory")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    # Validate everything before touching process-global state (logging config, signals).
    try:
        trust_domain = validate_trust_domain(args.trust_domain)
        identities = resolve_identities(args, trust_domain)
        directory = Path(args.dir).absolute()
        _prepare_dir(directory, [i.name for i in identities])
    except (UsageError, CAError) as err:
        parser.print_usage(sys.stderr)
        print(f"spike-dev-agent: error: {err}", file=sys.stderr)
        return 2

    configure_logging(args.log_level)
    log = structlog.get_logger("devagent")
    print(WARNING_BANNER, file=sys.stderr, flush=True)
    log.warning(
        "DEVELOPMENT ONLY — never use spike-dev-agent in production",
        reason="no workload attestation: any process that can open a socket gets its identity",
    )

    try:
        ca = _certificate_authority(args, trust_domain, log)
    except CAError as err:
        print(f"spike-dev-agent: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"spike-dev-agent: error: --ca-dir: {err}", file=sys.stderr)
        return 1
    return _serve(args, ca, identities, directory, trust_domain, log)


def _certificate_authority(args: argparse.Namespace, trust_domain: str,
                           log: FilteringBoundLogger) -> CertificateAuthority:
    """The persisted CA of --ca-dir (made, loaded or renewed), or a fresh in-memory one."""
    if args.ca_dir:
        ca, status = CertificateAuthority.load_or_generate(args.ca_dir, trust_domain)
        log.info("ca_" + status, ca_dir=str(Path(args.ca_dir).absolute()))
        if status == "renewed":
            log.warning("ca_renewed", reason="stored CA was about to expire")
        return ca
    ca = CertificateAuthority.generate(
        trust_domain, ttl=max(DEFAULT_CA_TTL, 4 * dt.timedelta(seconds=args.ttl))
    )
    log.info("ca_created", ephemeral=True)
    return ca


def _serve(args: argparse.Namespace, ca: CertificateAuthority, identities: list[Identity],
           directory: Path, trust_domain: str, log: FilteringBoundLogger) -> int:
    """Serve every socket until SIGTERM/SIGINT; 0 on a clean stop, 1 if serving failed."""
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    store = SvidStore(
        ca, identities, ttl=dt.timedelta(seconds=args.ttl), backdate=DEFAULT_BACKDATE, log=log
    )
    servers = AgentServers(store, directory, log=log)
    bundle_path = directory / BUNDLE_FILE
    try:
        bundle_path.write_bytes(ca.bundle_pem())
        servers.start()
    except (OSError, RuntimeError) as err:
        kind = "" if isinstance(err, SocketInUseError) else "cannot serve: "
        log.error("start_failed", error=str(err))
        print(f"spike-dev-agent: error: {kind}{err}", file=sys.stderr)
        servers.stop(grace=0)
        bundle_path.unlink(missing_ok=True)
        return 1
    store.start()

    log.info(
        "ready",
        dir=str(directory),
        trust_domain=trust_domain,
        ttl_seconds=args.ttl,
        identities={i.name: i.spiffe_id for i in identities},
    )
    print(f"ready {directory}", flush=True)

    while not stop.wait(0.5):
        pass

    log.info("shutting_down")
    servers.stop(grace=1.0)
    bundle_path.unlink(missing_ok=True)
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
