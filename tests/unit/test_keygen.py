from __future__ import annotations

import grp
import os
import re
import stat
from pathlib import Path

import dkim
import dns.rdatatype
import dns.zone
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from relaylab.cli import main
from relaylab.devstack.opendkim import opendkim_verify, parse_txt_record
from relaylab.dkim.keygen import (
    KeyWriteError,
    generate_key,
    genkey_txt,
    record_name,
    record_path,
    record_strings,
    record_value,
    txt_record,
    txt_record_oneline,
    write_private_key,
)
from relaylab.dkim.keys import SigningKey, dns_record_value, load_private_key, public_key_b64
from relaylab.dkim.signer import sign
from relaylab.policy.model import DkimAlgorithm, DkimKeyRef

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


# ---------------------------------------------------------------- the .txt record file


def zone_txt(domain: str, txt: str) -> tuple[str, list[bytes]]:
    """Parse the .txt as a zone-file entry of `domain`'s zone (dnspython's zone parser):
    its owner name and its <character-string>s."""
    zone = dns.zone.from_text(
        f"$ORIGIN {domain}.\n$TTL 300\n@ IN SOA ns hostmaster 1 7200 900 1209600 300\n"
        f"@ IN NS ns\n{txt}", relativize=False, check_origin=True)
    (owner, rdata), = [(name, rd) for name, ttl, rd in zone.iterate_rdatas(dns.rdatatype.TXT)]
    return owner.to_text(), list(rdata.strings)


@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
def test_keygen_writes_the_record_beside_the_key_and_it_verifies_signatures(
        tmp_path: Path, algorithm: str, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "keys" / "shop.example.com.rl26.key"
    assert main(["dkim", "keygen", "--domain", "Shop.Example.com", "--selector", "rl26",
                 "--algorithm", algorithm, "--out", str(out)]) == 0
    txt = tmp_path / "keys" / "shop.example.com.rl26.txt"
    assert str(txt) in capsys.readouterr().out
    assert stat.S_IMODE(txt.stat().st_mode) == 0o644
    text = txt.read_text()
    # opendkim-genkey's layout: relative owner, "IN TXT ( ... )", the naming comment.
    assert text.startswith(f'rl26._domainkey\tIN\tTXT\t( "v=DKIM1; k={algorithm}; "\n\t  "p=')
    assert text.endswith(' )  ; ----- DKIM key rl26 for shop.example.com\n')

    owner, strings = zone_txt("shop.example.com", text)
    assert owner == "rl26._domainkey.shop.example.com."
    assert all(len(s) <= 255 for s in strings)
    assert len(strings) == (3 if algorithm == "rsa" else 2)  # 2048-bit p= needs two strings
    rdata = b"".join(strings)
    assert rdata == parse_txt_record(text)  # as the devstack reads opendkim-genkey's files

    # A message signed with the new key verifies against that record, for dkimpy and for
    # OpenDKIM's verifier; nothing else feeds them the public key.
    alg = ED if algorithm == "ed25519" else RSA
    key = SigningKey(DkimKeyRef("shop.example.com", "rl26", alg, out), load_private_key(out, alg))
    headers = [(b"From", b" orders@shop.example.com"), (b"To", b" bob@example.net"),
               (b"Subject", b" your order")]
    body = b"Thank you.\r\n"
    (sig,) = sign(headers, body, [key], timestamp=1_700_000_000)
    message = b"DKIM-Signature: " + sig + b"\r\n" + b"".join(
        n + b":" + v + b"\r\n" for n, v in headers) + b"\r\n" + body
    records = {"rl26._domainkey.shop.example.com": rdata}

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        return records.get(name.decode().rstrip("."))

    assert dkim.verify(message, dnsfunc=dnsfunc)
    ok, detail = opendkim_verify(message, records)
    assert ok, detail


def test_print_record_prints_only_the_record(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "k.pem"
    assert main(["dkim", "keygen", "--domain", "shop.example.com", "--selector", "s1",
                 "--algorithm", "ed25519", "--out", str(out), "--print-record"]) == 0
    assert capsys.readouterr().out == (tmp_path / "k.txt").read_text()
    key = load_private_key(out, ED)
    out2 = tmp_path / "k2"
    assert main(["dkim", "keygen", "--domain", "shop.example.com", "--selector", "s2",
                 "--algorithm", "ed25519", "--out", str(out2), "--print-record", "value"]) == 0
    assert capsys.readouterr().out == record_value(load_private_key(out2, ED)) + "\n"
    assert (tmp_path / "k2.txt").read_text() == genkey_txt("shop.example.com", "s2",
                                                           load_private_key(out2, ED))
    assert record_value(key) != record_value(load_private_key(out2, ED))


def test_keygen_refuses_an_existing_record_file_and_writes_no_key(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "s1.txt").write_text("old record")
    assert main(["dkim", "keygen", "--domain", "shop.example.com", "--selector", "s1",
                 "--algorithm", "ed25519", "--out", str(tmp_path / "s1.key")]) == 1
    assert "s1.txt already exists" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s1.txt"]
    assert main(["dkim", "keygen", "--domain", "shop.example.com", "--selector", "s1",
                 "--algorithm", "ed25519", "--out", str(tmp_path / "s1.key"), "--force"]) == 0
    assert (tmp_path / "s1.txt").read_text().startswith("s1._domainkey\tIN\tTXT")


def test_record_path_is_beside_the_key() -> None:
    assert record_path(Path("/k/shop.example.com.rl1.key")) == Path("/k/shop.example.com.rl1.txt")
    assert record_path(Path("/k/rl1.private")) == Path("/k/rl1.txt")
    assert record_path(Path("/k/shop.example.com.rl1")) == Path("/k/shop.example.com.rl1.txt")
