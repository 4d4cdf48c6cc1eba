"""Bearer tokens: HS256-signed JWTs (RFC 7519), checked on every route.

Small enough to write out rather than depend on a JWT library: one algorithm,
fixed header, constant-time signature comparison, expiry checked.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

import msgspec

DEFAULT_TTL_S = 30 * 24 * 3600
_HEADER = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').rstrip(b"=")


class Claims(msgspec.Struct, frozen=True):
    sub: str  # the user id
    exp: int
    iat: int
    adm: bool = False


class InvalidToken(Exception):
    pass


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _unb64(data: bytes) -> bytes:
    return base64.urlsafe_b64decode(data + b"=" * (-len(data) % 4))


def mint(
    secret: str,
    user_id: str,
    *,
    admin: bool = False,
    ttl_s: int = DEFAULT_TTL_S,
    now: float | None = None,
) -> str:
    issued = int(now if now is not None else time.time())
    claims = Claims(sub=user_id, exp=issued + ttl_s, iat=issued, adm=admin)
    signing_input = _HEADER + b"." + _b64(msgspec.json.encode(claims))
    signature = hmac.new(secret.encode(), signing_input, hashlib.sha256).digest()
    return (signing_input + b"." + _b64(signature)).decode()


def verify(secret: str, token: str, *, now: float | None = None) -> Claims:
    parts = token.encode().split(b".")
    if len(parts) != 3 or parts[0] != _HEADER:
        raise InvalidToken("malformed token")
    expected = hmac.new(secret.encode(), parts[0] + b"." + parts[1], hashlib.sha256).digest()
    try:
        signature = _unb64(parts[2])
        claims = msgspec.json.decode(_unb64(parts[1]), type=Claims)
    except (ValueError, msgspec.DecodeError, msgspec.ValidationError) as err:
        raise InvalidToken("malformed token") from err
    if not hmac.compare_digest(signature, expected):
        raise InvalidToken("bad signature")
    if claims.exp < (now if now is not None else time.time()):
        raise InvalidToken("token expired")
    return claims
