"""The operator CLI: rules check, token mint, ca init."""

from __future__ import annotations

from pathlib import Path

import jwt
import pytest

from fleetgate.cli import main

REPO = Path(__file__).resolve().parents[2]


def test_rules_check_accepts_the_example_rules(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rules", "check", str(REPO / "rules")]) == 0
    assert "ok: revision" in capsys.readouterr().out


def test_rules_check_reports_file_line_and_path(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: fleetgate/v1\nauthorization:\n  rules:\n  - deny: 'nope('\n")
    assert main(["rules", "check", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "bad.yaml:4 at authorization.rules[0].deny: CEL:" in err


def test_token_mint_makes_a_verifiable_token(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    secret = tmp_path / "s"
    secret.write_bytes(b"k" * 40)
    assert main(["token", "mint", "--sub", "sec-1", "--claim", "agent_role=security",
                 "--claim", "depth=2", "--ttl", "15m", "--secret-file", str(secret)]) == 0
    tok = capsys.readouterr().out.strip()
    claims = jwt.decode(tok, b"k" * 40, algorithms=["HS256"])
    assert claims["sub"] == "sec-1" and claims["agent_role"] == "security"
    assert claims["depth"] == 2 and claims["exp"] - claims["iat"] == 900 and claims["jti"]


def test_ca_init_creates_a_ca_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ca", "init", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "created CA" in out and "SHA-256 fingerprint" in out
    key = tmp_path / "mitmproxy-ca.pem"
    assert key.stat().st_mode & 0o077 == 0  # private key readable by its owner only
    before = key.read_bytes()
    assert main(["ca", "init", "--dir", str(tmp_path)]) == 0
    assert "existing CA" in capsys.readouterr().out and key.read_bytes() == before
    # mitmproxy would write this into its confdir: present, the directory can be read-only
    assert b"-----BEGIN DH PARAMETERS-----" in (tmp_path / "mitmproxy-dhparam.pem").read_bytes()


def test_ca_init_lifetime_and_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import datetime

    from cryptography import x509
    assert main(["ca", "init", "--dir", str(tmp_path), "--cn", "acme egress CA",
                 "--days", "365"]) == 0
    assert "CN=acme egress CA" in capsys.readouterr().out
    cert = x509.load_pem_x509_certificate((tmp_path / "mitmproxy-ca-cert.pem").read_bytes())
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == datetime.timedelta(days=365)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
