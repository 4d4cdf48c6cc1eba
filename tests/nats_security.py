"""What a team's secured NATS is made of, made for a test in its temporary folder.

A private certificate authority with a server certificate for 127.0.0.1 and a
client certificate (mutual TLS), and NATS decentralised auth: an operator, an
account with JetStream and a user, as `nsc` would write them (the user's
`.creds` file, the account's JWT for the server's memory resolver), and a plain
NKey user. Made with `cryptography` and `nkeys`, which parley installs anyway.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import json
import os
import time
from pathlib import Path
from typing import Any

import msgspec
import nkeys
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


class Pki(msgspec.Struct, frozen=True):
    ca: Path  # the team's CA, which signed the server's and the client's certificates
    other_ca: Path  # a CA that signed neither
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path  # a client certificate signed by the other CA
    stranger_key: Path


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.write_bytes(pem)
    path.chmod(0o600)
    return path


def _write_cert(cert: x509.Certificate, path: Path) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _ca(common: str, key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(common))
        .issuer_name(_name(common))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


def _leaf(
    common: str,
    key: ec.EllipticCurvePrivateKey,
    ca: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    *,
    server: bool,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(ca_key, hashes.SHA256())


def make_pki(folder: Path) -> Pki:
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, other_key, server_key, client_key = _key(), _key(), _key(), _key()
    stranger_key = _key()
    ca = _ca("parley test CA", ca_key)
    other = _ca("another CA", other_key)
    return Pki(
        ca=_write_cert(ca, folder / "ca.pem"),
        other_ca=_write_cert(other, folder / "other-ca.pem"),
        server_cert=_write_cert(
            _leaf("localhost", server_key, ca, ca_key, server=True), folder / "server.pem"
        ),
        server_key=_write_key(server_key, folder / "server.key"),
        client_cert=_write_cert(
            _leaf("parley", client_key, ca, ca_key, server=False), folder / "client.pem"
        ),
        client_key=_write_key(client_key, folder / "client.key"),
        stranger_cert=_write_cert(
            _leaf("stranger", stranger_key, other, other_key, server=False),
            folder / "stranger.pem",
        ),
        stranger_key=_write_key(stranger_key, folder / "stranger.key"),
    )


# ---------------------------------------------------------------- NKeys and JWTs


def new_keys(prefix: int) -> nkeys.KeyPair:
    return nkeys.from_seed(nkeys.encode_seed(os.urandom(32), prefix))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _jwt(issuer: nkeys.KeyPair, subject: str, name: str, nats: dict[str, Any]) -> str:
    """A NATS JWT (v2) of `subject`, signed by `issuer`, as nsc writes them."""
    claims: dict[str, Any] = {
        "iat": int(time.time()),
        "iss": issuer.public_key.decode(),
        "name": name,
        "sub": subject,
        "nats": nats,
    }
    claims["jti"] = (
        base64.b32encode(hashlib.sha256(json.dumps(claims).encode()).digest()).rstrip(b"=").decode()
    )
    header = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    body = _b64(json.dumps(claims).encode())
    signature = _b64(issuer.sign(f"{header}.{body}".encode()))
    return f"{header}.{body}.{signature}"


UNLIMITED = -1


class Operator(msgspec.Struct, frozen=True):
    operator_jwt: Path
    account: str  # the account's public key
    account_jwt: str
    system: str  # the system account (JetStream needs one): its public key
    system_jwt: str
    creds: Path  # a user of the account: its JWT and seed, as `nsc generate creds` writes
    stranger_creds: Path  # a user signed by an account the server does not know


def creds_text(user_jwt: str, seed: bytes) -> str:
    return (
        "-----BEGIN NATS USER JWT-----\n"
        f"{user_jwt}\n"
        "------END NATS USER JWT------\n\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n"
        "NKEYs are sensitive and should be treated as secrets.\n\n"
        "-----BEGIN USER NKEY SEED-----\n"
        f"{seed.decode()}\n"
        "------END USER NKEY SEED------\n\n"
        "*************************************************************\n"
    )


def _user_creds(account: nkeys.KeyPair, path: Path) -> Path:
    user = new_keys(nkeys.PREFIX_BYTE_USER)
    user_jwt = _jwt(
        account,
        user.public_key.decode(),
        "parley",
        {
            "pub": {},
            "sub": {},
            "subs": UNLIMITED,
            "data": UNLIMITED,
            "payload": UNLIMITED,
            "type": "user",
            "version": 2,
        },
    )
    path.write_text(creds_text(user_jwt, user.seed))
    path.chmod(0o600)
    return path


def _account_jwt(
    operator: nkeys.KeyPair, account: nkeys.KeyPair, name: str, *, jetstream: bool
) -> str:
    storage = UNLIMITED if jetstream else 0
    return _jwt(
        operator,
        account.public_key.decode(),
        name,
        {
            "limits": {
                "subs": UNLIMITED,
                "data": UNLIMITED,
                "payload": UNLIMITED,
                "imports": UNLIMITED,
                "exports": UNLIMITED,
                "wildcards": True,
                "conn": UNLIMITED,
                "leaf": UNLIMITED,
                "mem_storage": storage,
                "disk_storage": storage,
                "streams": storage,
                "consumer": storage,
            },
            "default_permissions": {"pub": {}, "sub": {}},
            "type": "account",
            "version": 2,
        },
    )


def make_operator(folder: Path) -> Operator:
    folder.mkdir(parents=True, exist_ok=True)
    operator = new_keys(nkeys.PREFIX_BYTE_OPERATOR)
    account = new_keys(nkeys.PREFIX_BYTE_ACCOUNT)
    stranger = new_keys(nkeys.PREFIX_BYTE_ACCOUNT)
    system = new_keys(nkeys.PREFIX_BYTE_ACCOUNT)
    operator_jwt = _jwt(
        operator,
        operator.public_key.decode(),
        "TEAM",
        {"system_account": system.public_key.decode(), "type": "operator", "version": 2},
    )
    (folder / "operator.jwt").write_text(operator_jwt)
    return Operator(
        operator_jwt=folder / "operator.jwt",
        account=account.public_key.decode(),
        account_jwt=_account_jwt(operator, account, "PARLEY", jetstream=True),
        system=system.public_key.decode(),
        system_jwt=_account_jwt(operator, system, "SYS", jetstream=False),
        creds=_user_creds(account, folder / "parley.creds"),
        stranger_creds=_user_creds(stranger, folder / "stranger.creds"),
    )


def operator_config(op: Operator, pki: Pki, port: int, store: Path) -> str:
    """nats-server in operator mode (its accounts from JWTs, JetStream for PARLEY) behind
    mutual TLS: a client must show a certificate of the team's CA."""
    return f"""
listen: 127.0.0.1:{port}
jetstream {{ store_dir: "{store}" }}
tls {{
  cert_file: "{pki.server_cert}"
  key_file: "{pki.server_key}"
  ca_file: "{pki.ca}"
  verify: true
}}
operator: "{op.operator_jwt}"
system_account: {op.system}
resolver: MEMORY
resolver_preload: {{
  {op.account}: "{op.account_jwt}"
  {op.system}: "{op.system_jwt}"
}}
"""
