#!/usr/bin/env bash
# Register SPIKE's identities with a SPIRE server (`spire-server entry create`):
#
#   spiffe://TD/spike/nexus                    Nexus, with the pinned DNS SAN (NEXUS_DNS)
#   spiffe://TD/spike/pilot/role/superuser     Pilot, every operator RPC
#   spiffe://TD/spike/pilot/role/recover       Pilot, status / recover / backup verify only
#   spiffe://TD/workload/demo                  an example workload (secrets RPCs, per policy)
#
# Usage: deploy/spire/register.sh [--dry-run]     (or DRY_RUN=1)
#   --dry-run prints the commands, one per line, and runs nothing.
#
# Every setting below is an environment variable. Selector variables hold one or more
# selectors separated by spaces; each becomes one -selector flag. The defaults use SPIRE's
# unix workload attestor with the OS user each program runs as: the agent resolves the name
# to the uid on the workload's host (unix:uid:N pins the number instead; add
# unix:path:/opt/spike/bin/... or unix:sha256:... with the attestor's discover_workload_path).
#
# Rules this script keeps, and that hand-made entries must keep too:
# - Only the Nexus entry carries NEXUS_DNS. Pilot pins that DNS name as Nexus's identity in the
#   TLS handshake (grpcio cannot check a URI SAN there), so any other workload holding it could
#   pose as Nexus to Pilot and to workloads.
# - No entry gets -downstream (nor -admin, nor -federatesWith). -downstream makes the SVID a CA
#   certificate: a workload holding it could sign an SVID for any identity in the trust domain,
#   spiffe://TD/spike/pilot/role/superuser or spiffe://TD/spike/nexus included, and Nexus, which
#   trusts the trust domain's bundle, would accept it. -admin gives a workload the SPIRE server's
#   admin API; -federatesWith hands it other trust domains' bundles, which Nexus never trusts.
# - Each OS user matches exactly one Pilot role: keep the superuser and recover selectors
#   distinct (a workload matching both gets two SVIDs, and Pilot uses the first).
set -euo pipefail

TRUST_DOMAIN="${TRUST_DOMAIN:-spike.internal}"
NEXUS_DNS="${NEXUS_DNS:-nexus.spike.internal}"
# The SPIFFE ID of the SPIRE agent (or of a node alias made with `entry create -node`) on the
# host(s) the workloads run on: `spire-server agent list` shows it.
PARENT_ID="${PARENT_ID:-spiffe://${TRUST_DOMAIN}/spire/agent/join_token/REPLACE-WITH-AGENT-ID}"
NEXUS_PARENT_ID="${NEXUS_PARENT_ID:-$PARENT_ID}"
PILOT_PARENT_ID="${PILOT_PARENT_ID:-$PARENT_ID}"
WORKLOAD_PARENT_ID="${WORKLOAD_PARENT_ID:-$PARENT_ID}"

NEXUS_SELECTORS="${NEXUS_SELECTORS:-unix:user:spike-nexus}"           # deploy/systemd's User=
SUPERUSER_SELECTORS="${SUPERUSER_SELECTORS:-unix:user:spike-admin}"   # the operators' account
RECOVER_SELECTORS="${RECOVER_SELECTORS:-unix:user:spike-recover}"     # who may only unseal
WORKLOAD_SELECTORS="${WORKLOAD_SELECTORS:-unix:user:demo-app}"
WORKLOAD_ID="${WORKLOAD_ID:-spiffe://${TRUST_DOMAIN}/workload/demo}"

# Optional: SVID lifetime in seconds (empty = the server's default), the server's socket.
X509_SVID_TTL="${X509_SVID_TTL:-}"
SPIRE_SERVER="${SPIRE_SERVER:-spire-server}"
SERVER_SOCKET="${SERVER_SOCKET:-}"

DRY_RUN="${DRY_RUN:-0}"
for arg in "$@"; do
  case "$arg" in
    -n|--dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "register.sh: unknown argument: $arg (try --help)" >&2; exit 2 ;;
  esac
done

die() { echo "register.sh: $*" >&2; exit 2; }

[[ "$TRUST_DOMAIN" =~ ^[a-z0-9._-]+$ ]] || die "TRUST_DOMAIN is not a trust domain name: $TRUST_DOMAIN"
[[ "$NEXUS_DNS" =~ ^[A-Za-z0-9.-]+$ ]] || die "NEXUS_DNS is not a DNS name: $NEXUS_DNS"
for id in "$NEXUS_PARENT_ID" "$PILOT_PARENT_ID" "$WORKLOAD_PARENT_ID" "$WORKLOAD_ID"; do
  [[ "$id" == "spiffe://${TRUST_DOMAIN}/"* ]] || die "not a SPIFFE ID in ${TRUST_DOMAIN}: $id"
done
[[ "$WORKLOAD_ID" != "spiffe://${TRUST_DOMAIN}/spike/"* ]] \
  || die "WORKLOAD_ID must not be under spiffe://${TRUST_DOMAIN}/spike/ (Nexus's and Pilot's IDs)"
[[ "$SUPERUSER_SELECTORS" != "$RECOVER_SELECTORS" ]] \
  || die "SUPERUSER_SELECTORS and RECOVER_SELECTORS must differ (one Pilot role per OS user)"
if [[ "$DRY_RUN" != 1 && "$PARENT_ID" == *REPLACE-WITH-AGENT-ID ]]; then
  die "set PARENT_ID to the SPIRE agent's SPIFFE ID (see \`spire-server agent list\`)"
fi

server_args=()
if [[ -n "$SERVER_SOCKET" ]]; then
  server_args=(-socketPath "$SERVER_SOCKET")
fi

# register SPIFFE_ID PARENT_ID "SELECTORS" [extra entry create flags...]
register() {
  local spiffe_id="$1" parent_id="$2" selectors="$3"
  shift 3
  local cmd=("$SPIRE_SERVER" entry create "${server_args[@]}"
             -parentID "$parent_id" -spiffeID "$spiffe_id")
  local -a sels=()
  read -r -a sels <<< "$selectors"
  [[ ${#sels[@]} -gt 0 ]] || die "no selectors for $spiffe_id"
  local sel
  for sel in "${sels[@]}"; do
    cmd+=(-selector "$sel")
  done
  if [[ -n "$X509_SVID_TTL" ]]; then
    cmd+=(-x509SVIDTTL "$X509_SVID_TTL")
  fi
  cmd+=("$@")
  local word
  for word in "${cmd[@]}"; do
    case "$word" in
      -downstream|-admin|-federatesWith) die "refusing $word for $spiffe_id" ;;
    esac
  done
  if [[ "$PHASE" == check ]]; then
    return
  fi
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '%q ' "${cmd[@]}" | sed 's/ $//'
    printf '\n'
    return
  fi
  # Re-running is safe: an ID already registered under this parent is left as it is
  # (change it with `spire-server entry update`).
  if "$SPIRE_SERVER" entry show "${server_args[@]}" -spiffeID "$spiffe_id" \
       -parentID "$parent_id" 2>/dev/null | grep -q 'Entry ID'; then
    echo "register.sh: $spiffe_id is already registered under $parent_id, left as it is"
    return
  fi
  "${cmd[@]}"
}

all_entries() {
  register "spiffe://${TRUST_DOMAIN}/spike/nexus" "$NEXUS_PARENT_ID" "$NEXUS_SELECTORS" \
    -dns "$NEXUS_DNS"
  register "spiffe://${TRUST_DOMAIN}/spike/pilot/role/superuser" "$PILOT_PARENT_ID" \
    "$SUPERUSER_SELECTORS"
  register "spiffe://${TRUST_DOMAIN}/spike/pilot/role/recover" "$PILOT_PARENT_ID" \
    "$RECOVER_SELECTORS"
  register "$WORKLOAD_ID" "$WORKLOAD_PARENT_ID" "$WORKLOAD_SELECTORS"
}

# Check every entry first, so that a bad setting stops the script before anything is created.
PHASE=check all_entries
PHASE=run all_entries
