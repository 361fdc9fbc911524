"""The deployment files under deploy/ (systemd unit and its companions, SPIRE registration).

(a) ``systemd-analyze verify`` and ``systemd-analyze security --offline`` on the unit, with
    ExecStart pointed at this checkout's real ``spike-nexus`` entry point (verify refuses a
    missing binary); deliberately broken copies must be caught. systemd-analyze is skipped
    when missing locally and required under ``CI`` (``.ci/install-systemd.sh`` installs it).
(b) The settings a secrets store needs are in the unit, and its ExecStart flags and the
    example TOML load with Nexus's own configuration loader.
(c) sysusers.d / tmpfiles.d snippets applied to a temporary root.
(d) A real Nexus runs Pilot's main paths under the unit's own SystemCallFilter=,
    SystemCallErrorNumber=, MemoryDenyWriteExecute=, RestrictAddressFamilies= and
    SystemCallArchitectures=, rebuilt here as the seccomp filter systemd 252 installs.
(e) deploy/spire/register.sh: ``bash -n``, the dry run's commands, a run against a stand-in
    ``spire-server``, and its refusals.
(f) deploy/kubernetes/: ``kubernetes-validate --strict`` (it ships the Kubernetes JSON schemas)
    installed with ``pip --target`` into a throwaway directory and run in a new network
    namespace (no links) where ``unshare -n`` works, so the check is offline; broken copies
    must fail; the container's command line and the ConfigMap's TOML load with Nexus's
    configuration loader. pip needs PyPI: without it the test is skipped locally and fails
    under ``CI``.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import platform
import re
import shlex
import shutil
import socket
import stat
import struct
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from nexus.config import load_config
from tests.harness import TEST_PASSWORD, DevAgent, Nexus, base_env, pilot, pilot_json, short_tmpdir

ROOT = Path(__file__).resolve().parent.parent
SYSTEMD = ROOT / "deploy" / "systemd"
UNIT = SYSTEMD / "spike-nexus.service"
TOML = SYSTEMD / "nexus.toml"
SYSUSERS = SYSTEMD / "spike-nexus.sysusers"
TMPFILES = SYSTEMD / "spike-nexus.tmpfiles"
REGISTER = ROOT / "deploy" / "spire" / "register.sh"
MANIFEST = ROOT / "deploy" / "kubernetes" / "spike-nexus.yaml"
KUBERNETES_VALIDATE = "kubernetes-validate==1.37.0"  # bundles the schemas up to 1.37
INSTALLED_BINARY = "/opt/spike/bin/spike-nexus"


def systemd_tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is required under CI: run .ci/install-systemd.sh")
        pytest.skip(f"{name} not installed (.ci/install-systemd.sh installs Debian's systemd)")
    return found


def entry_point() -> str:
    """This checkout's spike-nexus console script (installed by `make install`)."""
    candidate = Path(sys.executable).parent / "spike-nexus"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which("spike-nexus")
    assert found, "no spike-nexus entry point: run `make install`"
    return found


def unit_text() -> str:
    return UNIT.read_text()


def local_copy(tmp_path: Path, text: str, name: str = "spike-nexus.service") -> Path:
    """The unit with ExecStart's binary replaced by this checkout's real entry point."""
    path = tmp_path / name
    path.write_text(text.replace(INSTALLED_BINARY, entry_point()))
    return path


def verify(path: Path) -> list[str]:
    """Problems `systemd-analyze verify` reports for the unit at ``path``.

    verify exits 0 on an unknown key or an unparsable value ("..., ignoring"), so every line
    it prints about the unit counts as a problem, as well as a non-zero exit.
    """
    result = subprocess.run([systemd_tool("systemd-analyze"), "verify", "--man=no", str(path)],
                            capture_output=True, text=True, timeout=120)
    lines = (result.stdout + result.stderr).splitlines()
    problems = [line for line in lines if path.name in line or "spike-nexus" in line]
    if result.returncode != 0:
        problems.append(f"exit code {result.returncode}: {lines}")
    return problems


def parse_unit(text: str) -> dict[str, list[str]]:
    """``Key`` -> every value it is given in [Service]/[Unit]/[Install] (keys may repeat)."""
    values: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        values.setdefault(key.strip(), []).append(value.strip())
    return values


# ---------------------------------------------------------------- (a) systemd-analyze


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    text = unit_text()
    assert f"ExecStart={INSTALLED_BINARY} " in text
    assert verify(local_copy(tmp_path, text)) == []


BROKEN = {
    "misspelled directive": ("LimitCORE=0", "LimitCroe=0"),
    "invalid value": ("ProtectSystem=strict", "ProtectSystem=strikt"),
    "unknown system call group": ("SystemCallFilter=@system-service",
                                  "SystemCallFilter=@system-servce"),
    "unknown address family": ("AF_UNIX AF_INET AF_INET6", "AF_UNIX AF_INET AF_INET7"),
    "missing binary": ("ExecStart=" + INSTALLED_BINARY, "ExecStart=/nonexistent/spike-nexus"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_verify_catches_a_broken_unit(tmp_path: Path, case: str) -> None:
    old, new = BROKEN[case]
    text = unit_text()
    assert old in text
    path = local_copy(tmp_path, text.replace(old, new))
    assert verify(path), f"systemd-analyze verify missed: {case}"


def security_exposure(path: Path) -> subprocess.CompletedProcess[str]:
    # --threshold is the exposure level x10 (0-100): 1.5, in systemd's "OK" band (the unit: 1.2).
    return subprocess.run(
        [systemd_tool("systemd-analyze"), "security", "--offline=yes", "--threshold=15",
         "--no-pager", str(path)],
        capture_output=True, text=True, timeout=120)


def test_unit_exposure_level_is_low(tmp_path: Path) -> None:
    result = security_exposure(local_copy(tmp_path, unit_text()))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Overall exposure level for spike-nexus.service" in result.stdout


def test_exposure_check_catches_a_weakened_unit(tmp_path: Path) -> None:
    sandbox = re.compile(r"^(Protect|Private|Restrict|SystemCall|Capability|NoNewPrivileges|"
                         r"MemoryDeny|LockPersonality|RemoveIPC|UMask|User|Group)")
    weak = "\n".join(line for line in unit_text().splitlines() if not sandbox.match(line))
    result = security_exposure(local_copy(tmp_path, weak + "\n"))
    assert result.returncode != 0, result.stdout


# ---------------------------------------------------------------- (b) settings and flags

REQUIRED = {
    "Type": "exec",
    "User": "spike-nexus",
    "Group": "spike-nexus",
    "StateDirectory": "spike-nexus",
    "StateDirectoryMode": "0700",
    "UMask": "0077",
    "LimitCORE": "0",
    "LimitMEMLOCK": "infinity",
    "NoNewPrivileges": "yes",
    "CapabilityBoundingSet": "",
    "AmbientCapabilities": "",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    "RestrictNamespaces": "yes",
    "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
    "SystemCallArchitectures": "native",
    "Restart": "on-failure",
}


def test_unit_has_what_a_secrets_store_needs() -> None:
    unit = parse_unit(unit_text())
    for key, value in REQUIRED.items():
        assert unit.get(key) == [value], (key, unit.get(key))
    assert unit["SystemCallFilter"][0] == "@system-service"
    assert all(v.startswith("~") for v in unit["SystemCallFilter"][1:])
    assert int(unit["LimitNOFILE"][0]) >= 65536
    assert "DynamicUser" not in unit  # the SPIRE selectors pin a stable user
    sockets = [v for v in unit["Environment"] if v.startswith("SPIFFE_ENDPOINT_SOCKET=")]
    assert len(sockets) == 1
    socket_path = sockets[0].split("=", 1)[1]
    assert socket_path.startswith("unix:///run/")  # not /tmp: PrivateTmp= would hide it
    assert "spike-keeper" in unit_text()  # says why there is no keeper unit


def test_execstart_flags_and_example_config_load() -> None:
    # load_config is spike-nexus's own parser: an unknown flag or TOML key fails here.
    unit = parse_unit(unit_text())
    argv = shlex.split(unit["ExecStart"][0])
    assert argv[0] == INSTALLED_BINARY
    args = argv[1:]
    assert args[args.index("--config") + 1] == "/etc/spike-nexus/nexus.toml"
    data_dir = args[args.index("--data-dir") + 1]
    assert data_dir == "/var/lib/" + unit["StateDirectory"][0]
    args[args.index("--config") + 1] = str(TOML)
    config = load_config(args, env={})
    assert str(config.data_dir) == data_dir
    assert config.trust_domain == "spike.internal"
    assert config.tls_name == "nexus.spike.internal"
    assert config.metrics_listen.startswith("127.0.0.1:")


# ---------------------------------------------------------------- (c) sysusers / tmpfiles


def test_sysusers_and_tmpfiles_apply_to_a_temporary_root(tmp_path: Path) -> None:
    sysusers = systemd_tool("systemd-sysusers")
    tmpfiles = systemd_tool("systemd-tmpfiles")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    result = subprocess.run([sysusers, f"--root={root}", str(SYSUSERS)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    users = {line.split(":")[0]: line.split(":") for line in
             (root / "etc" / "passwd").read_text().splitlines()}
    user = users["spike-nexus"]
    assert user[5] == "/var/lib/spike-nexus" and user[6] == "/usr/sbin/nologin"
    assert 0 < int(user[2]) < 1000  # a system user
    groups = {line.split(":")[0]: int(line.split(":")[2]) for line in
              (root / "etc" / "group").read_text().splitlines()}
    result = subprocess.run([tmpfiles, f"--root={root}", "--create", str(TMPFILES)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    made = (root / "etc" / "spike-nexus").stat()
    assert stat.S_IMODE(made.st_mode) == 0o750
    assert (made.st_uid, made.st_gid) == (0, groups["spike-nexus"])


# ---------------------------------------------------------------- (d) the unit's seccomp filter

# Classic BPF and seccomp constants (linux/filter.h, linux/seccomp.h, linux/audit.h).
LD_W_ABS, JMP_JEQ_K, JMP_JGE_K, ALU_AND_K, RET_K = 0x20, 0x15, 0x35, 0x54, 0x06
RET_ALLOW, RET_ERRNO, RET_KILL_PROCESS = 0x7FFF0000, 0x00050000, 0x80000000
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
PROT_WRITE, PROT_EXEC, SHM_EXEC = 2, 4, 0o100000
OFF_NR, OFF_ARCH = 0, 4


def off_arg(n: int) -> int:
    return 16 + 8 * n  # the low 32 bits of args[n] (little-endian)


def expand_group(name: str) -> set[str]:
    out = subprocess.run([systemd_tool("systemd-analyze"), "syscall-filter", "--no-pager", name],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    names: set[str] = set()
    for line in out.splitlines()[1:]:
        word = line.strip()
        if not word or word.startswith("#"):
            continue
        names |= expand_group(word) if word.startswith("@") else {word}
    return names


def syscall_numbers() -> dict[str, int]:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        if os.environ.get("CI"):
            pytest.fail("a C compiler's headers give the system call numbers: none found")
        pytest.skip("no C compiler (its <sys/syscall.h> gives the system call numbers)")
    out = subprocess.run([cc, "-E", "-dM", "-"], input="#include <sys/syscall.h>\n",
                         capture_output=True, text=True, timeout=60, check=True).stdout
    numbers = {}
    for match in re.finditer(r"^#define __NR_(\w+) (\d+)$", out, re.MULTILINE):
        numbers[match.group(1)] = int(match.group(2))
    assert len(numbers) > 250, "could not read the system call numbers"
    return numbers


def allowed_calls(filters: list[str]) -> set[str]:
    """The system calls that SystemCallFilter= lines allow, applied in order."""
    allowed: set[str] = set()
    for value in filters:
        deny = value.startswith("~")
        for word in value.lstrip("~").split():
            names = expand_group(word) if word.startswith("@") else {word}
            allowed = allowed - names if deny else allowed | names
    return allowed


def unit_filter(text: str) -> bytes:
    """The seccomp program systemd 252 installs for the unit's settings (see seccomp-util.c)."""
    machine = platform.machine()
    if machine not in AUDIT_ARCH:
        pytest.skip(f"system call numbers are wired for {sorted(AUDIT_ARCH)}, not {machine}")
    unit = parse_unit(text)
    allowed = allowed_calls(unit["SystemCallFilter"])
    error = getattr(errno, unit["SystemCallErrorNumber"][0])
    families = {getattr(socket, name) for name in unit["RestrictAddressFamilies"][0].split()}
    mdwe = unit.get("MemoryDenyWriteExecute") == ["yes"]
    nr = syscall_numbers()
    prog: list[tuple[int, int, int, int]] = [
        (LD_W_ABS, 0, 0, OFF_ARCH),
        (JMP_JEQ_K, 1, 0, AUDIT_ARCH[machine]),  # SystemCallArchitectures=native
        (RET_K, 0, 0, RET_KILL_PROCESS),
        (LD_W_ABS, 0, 0, OFF_NR),
    ]
    if machine == "x86_64":  # x32 calls
        prog += [(JMP_JGE_K, 0, 1, 0x40000000), (RET_K, 0, 0, RET_ERRNO | error)]

    def flag_check(names: list[str], arg: int, mask: int, refused_when: int) -> None:
        present = [nr[n] for n in names if n in nr and n in allowed]
        for i, number in enumerate(present):  # jump to the check, or skip past it
            prog.append((JMP_JEQ_K, len(present) - 1 - i, 0, number))
        if not present:
            return
        prog[-1] = (JMP_JEQ_K, 0, 5, present[-1])
        prog.extend([(LD_W_ABS, 0, 0, off_arg(arg)), (ALU_AND_K, 0, 0, mask),
                     (JMP_JEQ_K, 0, 1, refused_when), (RET_K, 0, 0, RET_ERRNO | errno.EPERM),
                     (RET_K, 0, 0, RET_ALLOW)])

    if mdwe:
        flag_check(["mmap", "mmap2"], 2, PROT_WRITE | PROT_EXEC, PROT_WRITE | PROT_EXEC)
        flag_check(["mprotect"], 2, PROT_EXEC, PROT_EXEC)
        flag_check(["pkey_mprotect"], 2, PROT_EXEC, PROT_EXEC)
        flag_check(["shmat"], 2, SHM_EXEC, SHM_EXEC)
    if "socket" in allowed:
        allowed_families = sorted(families)
        prog.append((JMP_JEQ_K, 0, len(allowed_families) + 3, nr["socket"]))
        prog.append((LD_W_ABS, 0, 0, off_arg(0)))
        for i, family in enumerate(allowed_families):
            prog.append((JMP_JEQ_K, len(allowed_families) - i, 0, family))
        prog.append((RET_K, 0, 0, RET_ERRNO | errno.EAFNOSUPPORT))
        prog.append((RET_K, 0, 0, RET_ALLOW))
    for name in sorted(allowed):
        if name in nr:
            prog += [(JMP_JEQ_K, 0, 1, nr[name]), (RET_K, 0, 0, RET_ALLOW)]
    prog.append((RET_K, 0, 0, RET_ERRNO | error))
    return b"".join(struct.pack("=HBBI", *insn) for insn in prog)


def sandboxed(program: bytes) -> Callable[[], None]:
    """A preexec_fn installing ``program`` (built in the parent) in the child before exec."""

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = SockFprog(len(program) // 8, ctypes.cast(buffer, ctypes.c_void_p))
    libc = ctypes.CDLL(None, use_errno=True)
    prctl = libc.prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong,
                      ctypes.c_ulong]

    def install() -> None:
        keep = (buffer, fprog)  # noqa: F841 - alive until exec
        if prctl(PR_SET_NO_NEW_PRIVS, 1, None, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
        if prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "PR_SET_SECCOMP")

    return install


PROBE = r"""
import ctypes, errno, json, mmap, os, socket
out = {}
def attempt(name, fn):
    try:
        fn(); out[name] = "allowed"
    except OSError as exc:
        out[name] = errno.errorcode.get(exc.errno, str(exc.errno))
attempt("wx_mmap", lambda: mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE
                                     | mmap.PROT_EXEC))
attempt("rw_mmap", lambda: mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE))
attempt("netlink", lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0).close())
attempt("inet6", lambda: socket.socket(socket.AF_INET6, socket.SOCK_STREAM).close())
attempt("chroot", lambda: os.chroot("/"))
from nexus.crypto.hardening import harden_process
r = harden_process()
out["hardening"] = [r.core_dumps_disabled, r.dumpable_off, r.mlock_available]
print(json.dumps(out))
"""


def probe(program: bytes) -> dict[str, object]:
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                            timeout=120, preexec_fn=sandboxed(program), cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    answer: dict[str, object] = json.loads(result.stdout)
    return answer


def test_the_rebuilt_filter_enforces_the_unit() -> None:
    answer = probe(unit_filter(unit_text()))
    assert answer == {"wx_mmap": "EPERM", "rw_mmap": "allowed", "netlink": "EAFNOSUPPORT",
                      "inet6": "allowed", "chroot": "EPERM", "hardening": [True, True, True]}


def test_the_rebuilt_filter_follows_the_unit_text() -> None:
    # A unit that took out what Nexus's hardening needs (prlimit64, prctl, mlock) is seen to
    # break it: the rebuilt filter is the unit's, not a fixed list.
    weakened = unit_text().replace("SystemCallFilter=~@privileged",
                                   "SystemCallFilter=~@memlock prlimit64 setrlimit prctl "
                                   "@privileged")
    answer = probe(unit_filter(weakened))
    assert answer["hardening"] == [False, False, False]


def test_nexus_serves_under_the_units_system_call_filter(agent: DevAgent, data_dir: Path,
                                                         tmp_path: Path) -> None:
    program = unit_filter(unit_text())
    password = tmp_path / "admin.pw"
    password.write_text(TEST_PASSWORD + "\n")
    password.chmod(0o600)
    # Production Argon2id (argon2-cffi), metrics (prometheus_client) and PEM-free SPIFFE.
    nexus = Nexus(data_dir, agent.env("nexus"), args=["--metrics-listen", "127.0.0.1:0"],
                  insecure_kdf=False, preexec_fn=sandboxed(program))
    try:
        status = Path(f"/proc/{nexus.proc.pid}/status").read_text()
        assert re.search(r"^Seccomp:\s+2$", status, re.MULTILINE), status
        assert re.search(r"^NoNewPrivs:\s+1$", status, re.MULTILINE), status
        env = agent.env("pilot")
        assert pilot_json(["status", "--output", "json"], env, nexus)["state"] == "uninitialized"
        result = pilot(["init", "--password-file", str(password)], env, nexus)
        assert result.returncode == 0, result.stderr
        result = pilot(["secret", "put", "apps/demo/db", "user=app", "pass=under-seccomp"], env,
                       nexus)
        assert result.returncode == 0, result.stderr
        result = pilot(["policy", "put", "demo",
                        "--spiffe-id-pattern", "^spiffe://spike.internal/workload/demo$",
                        "--path-pattern", "^apps/demo/.*$", "--permissions", "read"], env, nexus)
        assert result.returncode == 0, result.stderr
        result = pilot(["rotate"], env, nexus)
        assert result.returncode == 0, result.stderr
        result = pilot(["backup", "verify", "--password-file", str(password)], env, nexus)
        assert result.returncode == 0, result.stderr
        got = pilot_json(["secret", "get", "apps/demo/db", "--output", "json"],
                         agent.env("workload"), nexus)
        assert "under-seccomp" in json.dumps(got)
        address = next(e["address"] for e in nexus.log_events()
                       if e.get("event") == "metrics listening")
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=30) as response:
            assert b"spike_" in response.read()
    finally:
        rc = nexus.stop()
    events = [e.get("event") for e in nexus.log_events()]
    assert rc == 0, "".join(nexus.lines[-30:])
    assert "nexus stopped" in events
    assert "process hardening incomplete" not in events


# ---------------------------------------------------------------- (e) register.sh


def register(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items()
            if not k.endswith(("_SELECTORS", "_PARENT_ID", "_ID")) and k not in {
                "TRUST_DOMAIN", "NEXUS_DNS", "PARENT_ID", "DRY_RUN", "SPIRE_SERVER",
                "SERVER_SOCKET", "X509_SVID_TTL"}}
    return subprocess.run(["bash", str(REGISTER), *args], env={**base, **env},
                          capture_output=True, text=True, timeout=60)


def test_register_script_parses() -> None:
    result = subprocess.run(["bash", "-n", str(REGISTER)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert "set -euo pipefail" in REGISTER.read_text()


def entries(stdout: str) -> dict[str, list[str]]:
    """spiffeID -> the command's words, one ``spire-server entry create`` per line."""
    out = {}
    for line in stdout.splitlines():
        words = shlex.split(line)
        assert words[:3] == ["spire-server", "entry", "create"], line
        out[words[words.index("-spiffeID") + 1]] = words
    return out


def flag_values(words: list[str], flag: str) -> list[str]:
    return [words[i + 1] for i, word in enumerate(words) if word == flag]


def test_register_dry_run_prints_the_entries() -> None:
    result = register("--dry-run")
    assert result.returncode == 0, result.stderr
    made = entries(result.stdout)
    td = "spiffe://spike.internal"
    assert sorted(made) == sorted([f"{td}/spike/nexus", f"{td}/spike/pilot/role/superuser",
                                   f"{td}/spike/pilot/role/recover", f"{td}/workload/demo"])
    for spiffe_id, words in made.items():
        assert "-downstream" not in words and "-admin" not in words
        assert flag_values(words, "-parentID")[0].startswith(td + "/")
        assert flag_values(words, "-selector"), spiffe_id
        dns = flag_values(words, "-dns")
        assert dns == (["nexus.spike.internal"] if spiffe_id.endswith("/spike/nexus") else [])
    assert flag_values(made[f"{td}/spike/nexus"], "-selector") == ["unix:user:spike-nexus"]
    assert "-downstream" not in result.stdout


def test_register_dry_run_follows_its_variables() -> None:
    result = register(DRY_RUN="1", TRUST_DOMAIN="prod.example", NEXUS_DNS="nexus.prod.example",
                      PARENT_ID="spiffe://prod.example/spire/agent/x509pop/abc",
                      NEXUS_SELECTORS="unix:uid:998 unix:gid:998", X509_SVID_TTL="900",
                      SERVER_SOCKET="/run/spire/server/api.sock")
    assert result.returncode == 0, result.stderr
    made = entries(result.stdout)
    nexus = made["spiffe://prod.example/spike/nexus"]
    assert flag_values(nexus, "-dns") == ["nexus.prod.example"]
    assert flag_values(nexus, "-selector") == ["unix:uid:998", "unix:gid:998"]
    assert flag_values(nexus, "-parentID") == ["spiffe://prod.example/spire/agent/x509pop/abc"]
    for words in made.values():
        assert flag_values(words, "-x509SVIDTTL") == ["900"]
        assert flag_values(words, "-socketPath") == ["/run/spire/server/api.sock"]
    assert "spiffe://prod.example/workload/demo" in made


def test_register_runs_spire_server(tmp_path: Path) -> None:
    log = tmp_path / "calls"
    fake = tmp_path / "spire-server"
    fake.write_text("#!/usr/bin/env bash\n"
                    f"printf '%s\\n' \"$*\" >> {shlex.quote(str(log))}\n"
                    # `entry show` finds the workload already registered (a re-run).
                    "if [[ $2 == show && $* == *workload/demo* ]]; then echo 'Entry ID : x'; fi\n")
    fake.chmod(0o755)
    result = register(SPIRE_SERVER=str(fake),
                      PARENT_ID="spiffe://spike.internal/spire/agent/join_token/t1")
    assert result.returncode == 0, result.stderr
    calls = log.read_text().splitlines()
    creates = [c for c in calls if c.startswith("entry create")]
    assert len(creates) == 3  # the demo workload was already there
    assert "already registered" in result.stdout
    assert any("spiffe://spike.internal/spike/nexus" in c and "-dns nexus.spike.internal" in c
               for c in creates)
    assert not any("-downstream" in c for c in calls)


@pytest.mark.parametrize("env", [
    {},  # PARENT_ID still the placeholder
    {"DRY_RUN": "1", "SUPERUSER_SELECTORS": "unix:user:ops", "RECOVER_SELECTORS": "unix:user:ops"},
    {"DRY_RUN": "1", "WORKLOAD_SELECTORS": "unix:user:app -downstream"},
    {"DRY_RUN": "1", "WORKLOAD_ID": "spiffe://spike.internal/spike/pilot/role/superuser"},
    {"DRY_RUN": "1", "PARENT_ID": "spiffe://other.domain/spire/agent/x"},
    {"DRY_RUN": "1", "NEXUS_SELECTORS": " "},
], ids=["no-parent", "shared-role-selectors", "downstream", "workload-in-spike", "foreign-parent",
        "no-selectors"])
def test_register_refuses(env: dict[str, str]) -> None:
    result = register(**env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("register.sh: ")
    assert "entry create" not in result.stdout


# ---------------------------------------------------------------- (f) deploy/kubernetes


def _fail_or_skip(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"kubernetes-validate unavailable under CI: {reason}")
    pytest.skip(f"kubernetes-validate unavailable: {reason}")


@pytest.fixture(scope="module")
def kube_env() -> Iterator[dict[str, str]]:
    """An environment whose PYTHONPATH has kubernetes-validate (and PyYAML), installed with pip
    --target into a throwaway directory: nothing is added to the project's virtualenv."""
    home = short_tmpdir("kv-")
    try:
        env = {k: v for k, v in base_env().items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        try:
            result = subprocess.run(
                [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                 "--no-warn-script-location", "--target", str(home / "lib"),
                 KUBERNETES_VALIDATE], env=env, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            _fail_or_skip("pip install timed out")
        if result.returncode != 0:
            _fail_or_skip(f"pip install {KUBERNETES_VALIDATE} failed: {result.stderr[-2000:]}")
        yield {**env, "PYTHONPATH": str(home / "lib")}
    finally:
        shutil.rmtree(home, ignore_errors=True)


def offline(command: list[str]) -> list[str]:
    """``command`` in a new network namespace (no route anywhere) when this user may make one."""
    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, "-n", "true"], capture_output=True,
                                  timeout=60).returncode == 0:
        return [unshare, "-n", *command]
    return command


def kube_validate(env: dict[str, str], path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        offline([sys.executable, "-m", "kubernetes_validate", "--strict", "--kubernetes-version",
                 "1.33.0", str(path)]), env=env, capture_output=True, text=True, timeout=300)


# Installing kubernetes-validate (its schemas are thousands of files) is slow on a loaded machine.
@pytest.mark.timeout(1800)
def test_kubernetes_manifest_validates_offline(kube_env: dict[str, str]) -> None:
    result = kube_validate(kube_env, MANIFEST)
    assert result.returncode == 0, result.stdout + result.stderr
    for kind in ("namespace", "serviceaccount", "configmap", "service", "statefulset"):
        assert f"passed for resource {kind}/" in result.stdout + result.stderr, kind


@pytest.mark.timeout(1800)
@pytest.mark.parametrize(("old", "new"), [
    ("serviceAccountName:", "serviceAcountName:"),
    ("replicas: 1", "replicas: one"),
    ("driver: csi.spiffe.io", "driver: [csi.spiffe.io]"),
], ids=["unknown-field", "wrong-type", "csi-driver-not-a-string"])
def test_kubernetes_validation_catches_a_broken_manifest(kube_env: dict[str, str],
                                                         tmp_path: Path, old: str,
                                                         new: str) -> None:
    text = MANIFEST.read_text()
    assert old in text
    broken = tmp_path / "spike-nexus.yaml"
    broken.write_text(text.replace(old, new))
    result = kube_validate(kube_env, broken)
    assert result.returncode != 0, result.stdout + result.stderr


KUBE_EXTRACT = r"""
import json, sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
sts = next(d for d in docs if d["kind"] == "StatefulSet")
cm = next(d for d in docs if d["kind"] == "ConfigMap")
pod = sts["spec"]["template"]["spec"]
c = pod["containers"][0]
print(json.dumps({"args": c["args"], "env": c["env"], "toml": cm["data"]["nexus.toml"],
                  "mounts": c["volumeMounts"], "volumes": pod["volumes"],
                  "security": c["securityContext"], "pod_security": pod["securityContext"],
                  "replicas": sts["spec"]["replicas"]}))
"""


@pytest.mark.timeout(1800)
def test_kubernetes_command_line_and_config_load(kube_env: dict[str, str],
                                                 tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-c", KUBE_EXTRACT, str(MANIFEST)], env=kube_env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    spec = json.loads(result.stdout)
    toml = tmp_path / "nexus.toml"
    toml.write_text(spec["toml"])
    args = spec["args"]
    assert args[0] == "spike-nexus"
    args = args[1:]
    mounts = {m["name"]: m["mountPath"] for m in spec["mounts"]}
    assert args[args.index("--config") + 1] == mounts["config"] + "/nexus.toml"
    args[args.index("--config") + 1] = str(toml)
    config = load_config(args, env={})
    assert str(config.data_dir) == mounts["data"]
    assert config.tls_name == "nexus.spike.internal"
    socket_env = next(e["value"] for e in spec["env"] if e["name"] == "SPIFFE_ENDPOINT_SOCKET")
    assert socket_env.startswith("unix://" + mounts["spiffe-workload-api"] + "/")
    csi = next(v["csi"] for v in spec["volumes"] if v["name"] == "spiffe-workload-api")
    assert csi == {"driver": "csi.spiffe.io", "readOnly": True}
    assert spec["security"]["allowPrivilegeEscalation"] is False
    assert spec["security"]["readOnlyRootFilesystem"] is True
    assert spec["security"]["capabilities"] == {"drop": ["ALL"]}
    assert spec["pod_security"]["runAsNonRoot"] is True
    assert spec["replicas"] == 1  # SQLite: one Nexus per data directory
