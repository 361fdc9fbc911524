"""nexus/config.py: defaults < TOML file < SPIKE_NEXUS_* environment < flags, and refusals."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from nexus.config import NexusConfig, load_config
from spike.errors import ConfigError
from tests.harness import PY, DevAgent


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "nexus.toml"
    path.write_text(text)
    return path


# --- defaults (README, Configuration) ---------------------------------------------------


def test_defaults() -> None:
    config = load_config([], {})
    assert config.listen == "127.0.0.1:8553"
    assert config.tls_name == "nexus.spike.internal"
    assert config.trust_domain == "spike.internal"
    assert config.nexus_spiffe_id == "spiffe://spike.internal/spike/nexus"
    assert config.store == "sqlite"
    assert config.data_dir == Path("spike-data")
    assert config.backup_path == Path("spike-data") / "root-key.backup"
    assert config.sqlite_path == Path("spike-data") / "spike.db"
    assert config.audit_target == str(Path("spike-data") / "audit.jsonl")
    assert config.metrics_listen == ""
    assert (config.kdf_time_cost, config.kdf_memory_kib, config.kdf_parallelism) == (3, 65536, 4)
    assert config.insecure_test_kdf is False
    assert config.max_connection_age_seconds == 300.0
    assert config.recover_backoff_seconds == 1.0
    assert config.backup_verify_interval_seconds == 3600.0
    assert config.max_secret_versions == 10
    assert config.max_value_bytes == 65536
    assert config.scheduler_check_seconds == 60.0
    assert config.svid_cert is config.svid_key is config.trust_bundle is None


def test_derived_paths_follow_data_dir_unless_set() -> None:
    config = load_config(["--data-dir", "/srv/spike"], {})
    assert config.backup_path == Path("/srv/spike/root-key.backup")
    assert config.sqlite_path == Path("/srv/spike/spike.db")
    assert config.audit_target == "/srv/spike/audit.jsonl"
    config = load_config(
        ["--data-dir", "/srv/spike", "--backup-file", "/safe/rk.backup", "--audit-file", "-"], {}
    )
    assert config.backup_path == Path("/safe/rk.backup")
    assert config.audit_target == "-"  # stderr


def test_paths_and_numbers_are_coerced(tmp_path: Path) -> None:
    toml = write_toml(tmp_path, 'data-dir = "/from/file"\nmax_secret_versions = 4\n')
    config = load_config(
        ["--config", str(toml), "--kdf-time-cost", "5", "--max-connection-age-seconds", "12.5"],
        {"SPIKE_NEXUS_BACKUP_FILE": "/env/rk.backup", "SPIKE_NEXUS_MAX_VALUE_BYTES": "1024"},
    )
    assert isinstance(config.data_dir, Path) and config.data_dir == Path("/from/file")
    assert isinstance(config.backup_file, Path) and config.backup_path == Path("/env/rk.backup")
    assert config.kdf_time_cost == 5 and isinstance(config.kdf_time_cost, int)
    assert config.max_connection_age_seconds == 12.5
    assert config.max_value_bytes == 1024 and isinstance(config.max_value_bytes, int)
    assert config.max_secret_versions == 4


# --- precedence ----------------------------------------------------------------------------


def test_precedence_flags_over_env_over_file_over_defaults(tmp_path: Path) -> None:
    toml = write_toml(
        tmp_path,
        'listen = "10.0.0.1:1"\n'
        'trust-domain = "file.example"\n'
        'tls_name = "file.nexus.example"\n'
        "kdf-parallelism = 2\n",
    )
    env = {
        "SPIKE_NEXUS_CONFIG": str(toml),
        "SPIKE_NEXUS_LISTEN": "10.0.0.2:2",
        "SPIKE_NEXUS_TRUST_DOMAIN": "env.example",
    }
    config = load_config(["--listen", "10.0.0.3:3"], env)
    assert config.listen == "10.0.0.3:3"  # flag beats env and file
    assert config.trust_domain == "env.example"  # env beats file
    assert config.nexus_spiffe_id == "spiffe://env.example/spike/nexus"
    assert config.tls_name == "file.nexus.example"  # file beats default
    assert config.kdf_parallelism == 2
    assert config.kdf_memory_kib == 65536  # default where nobody says anything


def test_config_flag_beats_config_env(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    flag_file = write_toml(tmp_path / "a", 'listen = "10.0.0.1:1"\n')
    env_file = write_toml(tmp_path / "b", 'listen = "10.0.0.2:2"\n')
    config = load_config(["--config", str(flag_file)], {"SPIKE_NEXUS_CONFIG": str(env_file)})
    assert config.listen == "10.0.0.1:1"


def test_env_is_the_given_mapping_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPIKE_NEXUS_LISTEN", "10.9.9.9:9")
    assert load_config([], {}).listen == "127.0.0.1:8553"
    assert load_config([]).listen == "10.9.9.9:9"  # env=None reads os.environ


# --- refusals ------------------------------------------------------------------------------


def test_unknown_toml_key_refused_with_its_name(tmp_path: Path) -> None:
    toml = write_toml(tmp_path, 'listen = "127.0.0.1:1"\nlisten_adress = "127.0.0.1:2"\n')
    with pytest.raises(ConfigError, match=r"unknown key .*listen_adress"):
        load_config(["--config", str(toml)], {})


def test_toml_table_is_an_unknown_key(tmp_path: Path) -> None:
    toml = write_toml(tmp_path, "[nexus]\nlisten = \"127.0.0.1:1\"\n")
    with pytest.raises(ConfigError, match=r"unknown key .*nexus"):
        load_config(["--config", str(toml)], {})


def test_unreadable_or_invalid_toml_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(["--config", str(tmp_path / "missing.toml")], {})
    broken = write_toml(tmp_path, "listen = \n")
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config([], {"SPIKE_NEXUS_CONFIG": str(broken)})


@pytest.mark.parametrize(
    ("argv", "env"),
    [
        (["--kdf-time-cost", "three"], {}),
        (["--max-secret-versions", "2.5"], {}),
        ([], {"SPIKE_NEXUS_KDF_MEMORY_KIB": "64MiB"}),
        ([], {"SPIKE_NEXUS_RECOVER_BACKOFF_SECONDS": "soon"}),
    ],
    ids=["flag-word", "flag-fraction", "env-unit", "env-float-word"],
)
def test_non_numeric_values_refused(argv: list[str], env: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="invalid value for"):
        load_config(argv, env)


@pytest.mark.parametrize(
    "line",
    [
        'kdf_time_cost = "three"',
        "max_secret_versions = 2.5",  # would silently become 2
        "kdf_memory_kib = true",  # would silently become 1
        "max_value_bytes = [1024]",
        "recover_backoff_seconds = true",
        "listen = 8553",
        'data_dir = ["a", "b"]',
    ],
)
def test_wrongly_typed_toml_values_refused(tmp_path: Path, line: str) -> None:
    toml = write_toml(tmp_path, line + "\n")
    with pytest.raises(ConfigError, match="invalid value for"):
        load_config(["--config", str(toml)], {})


def test_test_only_kdf_switch_is_flag_only(tmp_path: Path) -> None:
    for value in ("0", "1", "maybe"):
        with pytest.raises(ConfigError, match="only as a command-line flag"):
            load_config([], {"SPIKE_NEXUS_INSECURE_TEST_KDF": value})
    toml = write_toml(tmp_path, "insecure_test_kdf = true\n")
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(["--config", str(toml)], {})


def test_postgres_needs_dsn() -> None:
    with pytest.raises(ConfigError, match="--dsn"):
        load_config(["--store", "postgres"], {})
    config = load_config(["--store", "postgres"], {"SPIKE_NEXUS_DSN": "postgresql:///spike"})
    assert config.dsn == "postgresql:///spike"


def test_unknown_store_refused() -> None:
    with pytest.raises(ConfigError, match="sqlite or postgres"):
        load_config(["--store", "mysql"], {})


@pytest.mark.parametrize(
    "given",
    [
        ["--svid-cert", "c.pem"],
        ["--svid-key", "k.pem"],
        ["--svid-cert", "c.pem", "--svid-key", "k.pem"],
        ["--svid-key", "k.pem", "--trust-bundle", "b.pem"],
    ],
)
def test_partial_pem_trio_refused(given: list[str]) -> None:
    with pytest.raises(ConfigError, match="go together"):
        load_config(given, {})


def test_full_pem_trio_from_mixed_sources(tmp_path: Path) -> None:
    toml = write_toml(tmp_path, 'svid_cert = "c.pem"\n')
    config = load_config(
        ["--config", str(toml), "--trust-bundle", "b.pem"], {"SPIKE_NEXUS_SVID_KEY": "k.pem"}
    )
    assert (config.svid_cert, config.svid_key, config.trust_bundle) == (
        Path("c.pem"), Path("k.pem"), Path("b.pem"),
    )


@pytest.mark.parametrize("listen", ["bogus", "127.0.0.1:notaport", ":8553", "127.0.0.1:70000"])
def test_listen_must_be_host_port(listen: str) -> None:
    with pytest.raises(ConfigError, match="HOST:PORT"):
        load_config(["--listen", listen], {})


@pytest.mark.parametrize("listen", ["127.0.0.1:0", "0.0.0.0:8553", "[::1]:8553", "nexus:1"])
def test_listen_accepts_host_port(listen: str) -> None:
    assert load_config(["--listen", listen], {}).listen == listen


@pytest.mark.parametrize("address", ["bogus", "10.0.0.1:port", ":8553"])
def test_advertise_address_must_be_host_port(address: str) -> None:
    with pytest.raises(ConfigError, match="--advertise-address must be HOST:PORT"):
        load_config(["--advertise-address", address], {})
    assert load_config(["--advertise-address", "nexus-2.internal:8553"],
                       {}).advertise_address == "nexus-2.internal:8553"
    assert load_config([], {}).advertise_address == ""  # the listen address, as bound


def test_node_lease_is_at_least_two_heartbeats() -> None:
    assert load_config([], {}).node_lease_seconds == 10.0
    assert load_config(["--node-lease-seconds", "30"], {}).node_lease_seconds == 30.0
    with pytest.raises(ConfigError, match="node_lease_seconds must be at least 4"):
        load_config(["--node-lease-seconds", "3"], {})


def test_max_secret_versions_at_least_one() -> None:
    with pytest.raises(ConfigError, match="at least 1"):
        load_config(["--max-secret-versions", "0"], {})


def test_insecure_test_kdf_is_hidden_from_help() -> None:
    from nexus.config import build_parser

    assert "insecure" not in build_parser().format_help()
    assert load_config(["--insecure-test-kdf"], {}).insecure_test_kdf is True


def test_every_field_has_a_flag() -> None:
    from dataclasses import fields

    from nexus.config import build_parser

    options = {a for action in build_parser()._actions for a in action.option_strings}
    for f in fields(NexusConfig):
        assert "--" + f.name.replace("_", "-") in options, f.name


# --- the real program ----------------------------------------------------------------------


def run_nexus(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-m", "nexus", *args], env=env, capture_output=True, text=True, timeout=60,
    )


def test_nexus_bad_listen_exits_2(agent: DevAgent, data_dir: Path) -> None:
    result = run_nexus(["--listen", "bogus", "--data-dir", str(data_dir)], agent.env("nexus"))
    assert result.returncode == 2, result.stderr
    assert "spike-nexus: --listen must be HOST:PORT, got 'bogus'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not any(data_dir.iterdir())  # refused before touching anything


def test_nexus_weak_argon2id_exits_1(agent: DevAgent, data_dir: Path) -> None:
    result = run_nexus(
        ["--listen", "127.0.0.1:0", "--data-dir", str(data_dir), "--kdf-memory-kib", "1024"],
        agent.env("nexus"),
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "spike-nexus: invalid Argon2id parameters" in result.stderr, result.stderr
    assert "nexus listening" not in result.stderr
