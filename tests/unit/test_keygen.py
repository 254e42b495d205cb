from __future__ import annotations

import grp
import os
import re
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from relaylab.dkim.keygen import (
    KeyWriteError,
    generate_key,
    record_name,
    record_strings,
    record_value,
    txt_record,
    txt_record_oneline,
    write_private_key,
)
from relaylab.dkim.keys import dns_record_value, load_private_key, public_key_b64
from relaylab.policy.model import DkimAlgorithm

RSA = DkimAlgorithm.RSA_SHA256
ED = DkimAlgorithm.ED25519_SHA256


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    key = generate_key(RSA)
    assert isinstance(key, rsa.RSAPrivateKey)
    return key


@pytest.fixture(scope="module")
def ed_key() -> ed25519.Ed25519PrivateKey:
    key = generate_key(ED)
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    return key


def _quoted(zone: str) -> list[str]:
    return re.findall(r'"([^"]*)"', zone)


def test_generate_rsa_default_is_2048_bits(rsa_key: rsa.RSAPrivateKey) -> None:
    assert rsa_key.key_size == 2048


def test_generate_rsa_rejects_silly_sizes() -> None:
    with pytest.raises(ValueError, match="between 1024 and 4096"):
        generate_key(RSA, bits=512)
    with pytest.raises(ValueError):
        generate_key(RSA, bits=8192)


def test_generate_ed25519_ignores_bits() -> None:
    assert isinstance(generate_key(ED, bits=512), ed25519.Ed25519PrivateKey)


def test_written_file_is_0640_for_its_directory_group_and_round_trips(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    path = tmp_path / "rl2026r.pem"
    assert write_private_key(rsa_key, path) == 0o640
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert path.stat().st_gid == tmp_path.stat().st_gid
    loaded = load_private_key(path, RSA)
    assert public_key_b64(loaded) == public_key_b64(rsa_key)
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    # No temporary files left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rl2026r.pem"]


def test_mode_is_0640_even_with_a_permissive_umask(
    tmp_path: Path, ed_key: ed25519.Ed25519PrivateKey
) -> None:
    old = os.umask(0)
    try:
        write_private_key(ed_key, tmp_path / "k.pem")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "k.pem").stat().st_mode) == 0o640


def test_key_in_a_service_group_directory_is_readable_by_that_group(
    tmp_path: Path, ed_key: ed25519.Ed25519PrivateKey
) -> None:
    """/etc/relaylab/keys is root:relaylab (scripts/install.sh): a key made there by root
    must be readable by the services' group, not root:root 0600 as it used to be."""
    group = grp.getgrnam("postfix")  # any group root is not in by default
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o750)
    os.chown(keys, 0, group.gr_gid)
    write_private_key(ed_key, keys / "k.pem")
    st = (keys / "k.pem").stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, group.gr_gid, 0o640)


def test_ed25519_round_trips(tmp_path: Path, ed_key: ed25519.Ed25519PrivateKey) -> None:
    path = tmp_path / "ed.pem"
    write_private_key(ed_key, path)
    assert public_key_b64(load_private_key(path, ED)) == public_key_b64(ed_key)


def test_refuses_to_overwrite(tmp_path: Path, rsa_key: rsa.RSAPrivateKey,
                              ed_key: ed25519.Ed25519PrivateKey) -> None:
    path = tmp_path / "k.pem"
    path.write_bytes(b"precious")
    with pytest.raises(KeyWriteError, match="already exists"):
        write_private_key(rsa_key, path)
    assert path.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.pem"]


def test_refuses_to_overwrite_through_a_dangling_symlink(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    link = tmp_path / "k.pem"
    link.symlink_to(tmp_path / "elsewhere.pem")
    with pytest.raises(KeyWriteError, match="already exists"):
        write_private_key(rsa_key, link)
    assert not (tmp_path / "elsewhere.pem").exists()


def test_overwrite_replaces(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    path = tmp_path / "k.pem"
    path.write_bytes(b"old")
    path.chmod(0o644)
    write_private_key(rsa_key, path, overwrite=True)
    assert public_key_b64(load_private_key(path, RSA)) == public_key_b64(rsa_key)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_creates_missing_parent_with_0750(tmp_path: Path, ed_key: ed25519.Ed25519PrivateKey) -> None:
    old = os.umask(0o022)
    try:
        write_private_key(ed_key, tmp_path / "keys" / "ed.pem")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) == 0o750
    assert (tmp_path / "keys" / "ed.pem").is_file()


def test_rsa_txt_record(rsa_key: rsa.RSAPrivateKey) -> None:
    zone = txt_record("Shop.Example.com.", "rl2026r", rsa_key)
    first = zone.splitlines()[0]
    assert first.startswith('rl2026r._domainkey.shop.example.com. IN TXT ( "v=DKIM1; k=rsa; "')
    assert zone.endswith('" )')
    strings = _quoted(zone)
    assert all(len(s.encode()) <= 255 for s in strings)
    assert len(strings) >= 3  # 2048-bit p= is ~392 chars: must be split
    joined = "".join(strings)
    assert joined == dns_record_value(rsa_key)
    assert joined.split("p=", 1)[1] == public_key_b64(rsa_key)
    assert "h=" not in joined


def test_rsa_oneline_and_web_ui_variants(rsa_key: rsa.RSAPrivateKey) -> None:
    line = txt_record_oneline("shop.example.com", "rl2026r", rsa_key)
    assert "\n" not in line
    assert line.startswith('rl2026r._domainkey.shop.example.com. IN TXT "v=DKIM1; k=rsa; " "p=')
    assert "".join(_quoted(line)) == record_value(rsa_key)
    assert all(len(s) <= 255 for s in record_strings(rsa_key))
    assert record_name("shop.example.com.", "rl2026r") == "rl2026r._domainkey.shop.example.com"
    assert record_value(rsa_key) == f"v=DKIM1; k=rsa; p={public_key_b64(rsa_key)}"


def test_rsa_3072_record_strings_stay_under_255() -> None:
    key = generate_key(RSA, bits=3072)
    strings = record_strings(key)
    assert max(len(s) for s in strings) == 255
    assert "".join(strings) == record_value(key)


def test_ed25519_txt_record(ed_key: ed25519.Ed25519PrivateKey) -> None:
    zone = txt_record("shop.example.com", "rl2026e", ed_key)
    strings = _quoted(zone)
    assert strings[0] == "v=DKIM1; k=ed25519; "
    tags = dict(t.strip().split("=", 1) for t in "".join(strings).split(";"))
    assert tags["k"] == "ed25519"
    assert len(tags["p"]) == 44
    assert tags["p"] == public_key_b64(ed_key)


def test_parent_that_is_a_file_is_a_clean_error(tmp_path: Path,
                                                ed_key: ed25519.Ed25519PrivateKey) -> None:
    (tmp_path / "keys").write_text("not a directory")
    with pytest.raises(KeyWriteError, match="cannot create directory"):
        write_private_key(ed_key, tmp_path / "keys" / "ed.pem")
