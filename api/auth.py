"""Bearer tokens: JWTs (RFC 7519) verified with PyJWT, on every non-public route.

Two kinds are accepted, by configuration:

- HS256 signed with the shared secret (`PARLEY_JWT_SECRET`, or the data
  folder's secret in `parley dev`): what `parley token` mints;
- RS256 / ES256 from a team's identity provider, whose public keys come from
  its JWKS URL; the issuer and audience are checked on these.

The token's header names its algorithm, and the algorithm picks the key: the
shared secret only ever checks HS256, the JWKS keys only the asymmetric
algorithms. So `alg: none`, an algorithm not listed, or an HS256 token "signed"
with a public key (algorithm confusion) are refused before any signature is
looked at.

The JWKS is fetched with aiohttp, not PyJWT's PyJWKClient: that client is
synchronous (urllib on the event loop, or a thread per request) and fetches the
key set again for every token whose `kid` it does not know, so anyone could make
the edge hammer the identity provider. Here the set is cached for
`jwks_cache_s`, and an unknown `kid` refetches at most once per
`jwks_refresh_s` (a key rotated in at the provider is picked up that quickly).

A token that passed is remembered (by its SHA-256) for `REMEMBER_S`, never past
its `exp`; one that failed is checked again every time.

Claims: `sub` (the user id; it must be 1-128 characters of A-Z a-z 0-9 _ -,
since user ids name log subjects and keys), `exp` (required), `adm` (true for
an admin token; see README "Tokens").
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import aiohttp
import jwt
import msgspec

from events.errors import describe
from events.subjects import valid_id

log = logging.getLogger(__name__)

DEFAULT_TTL_S = 30 * 24 * 3600
# How long a token that passed stands without a new check, and how many are kept.
# A key withdrawn at the identity provider goes on admitting a remembered token at
# most this much longer than it admits new ones (the key set itself is cached for
# `JwksKeys.cache_s`, 5 minutes).
REMEMBER_S = 60.0
MAX_REMEMBERED = 10_000
ASYMMETRIC = ("RS256", "ES256")


class Claims(msgspec.Struct, frozen=True):
    sub: str  # the user id
    exp: float  # a NumericDate, which RFC 7519 lets have a fraction
    iat: float = 0
    adm: bool = False


class InvalidToken(Exception):
    """A token the edge refuses; the message says why (never the token itself)."""


def mint(
    secret: str,
    user_id: str,
    *,
    admin: bool = False,
    ttl_s: int = DEFAULT_TTL_S,
    now: float | None = None,
) -> str:
    """An HS256 token for `user_id`, as `parley token` prints it."""
    issued = int(now if now is not None else time.time())
    claims = {"sub": user_id, "exp": issued + ttl_s, "iat": issued, "adm": admin}
    return jwt.encode(claims, secret, algorithm="HS256")


class JwksKeys:
    """The identity provider's public keys by `kid`, fetched from its JWKS URL."""

    def __init__(
        self,
        url: str,
        http: aiohttp.ClientSession,
        *,
        cache_s: float = 300.0,
        refresh_s: float = 30.0,
        timeout_s: float = 5.0,
    ) -> None:
        self._url = url
        self._http = http
        self._cache_s = cache_s
        self._refresh_s = refresh_s
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched = float("-inf")  # last successful fetch
        self._attempted = float("-inf")  # last fetch, successful or not
        self._lock = asyncio.Lock()

    async def get(self, kid: str) -> jwt.PyJWK:
        now = time.monotonic()
        wanted = kid not in self._keys or now - self._fetched > self._cache_s
        if wanted and now - self._attempted > self._refresh_s:
            async with self._lock:  # one fetch for a crowd of requests
                if self._attempted < now:
                    await self._fetch()
        key = self._keys.get(kid)
        if key is None:
            raise InvalidToken(f"no key {kid!r} in the identity provider's key set")
        return key

    async def _fetch(self) -> None:
        self._attempted = time.monotonic()
        try:
            async with self._http.get(self._url, timeout=self._timeout) as response:
                response.raise_for_status()
                data = await response.json(content_type=None)
            keys = jwt.PyJWKSet.from_dict(data).keys
        except (aiohttp.ClientError, TimeoutError, ValueError, jwt.PyJWTError) as err:
            # Keep the keys we had: an identity provider that blips must not log everyone out.
            log.warning("cannot fetch the JWKS", extra={"url": self._url, "error": describe(err)})
            return
        self._keys = {key.key_id: key for key in keys if key.key_id}
        self._fetched = time.monotonic()


class Verifier:
    """Checks a bearer token and returns its claims, or raises InvalidToken."""

    def __init__(
        self,
        *,
        secret: str | None = None,
        jwks: JwksKeys | None = None,
        issuer: str | None = None,
        audience: str | None = None,
        leeway_s: float = 30.0,
        remember_s: float = REMEMBER_S,
        max_remembered: int = MAX_REMEMBERED,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if secret is None and jwks is None:
            raise ValueError("a Verifier needs a secret or a JWKS")
        self._secret = secret
        self._jwks = jwks
        self._issuer = issuer
        self._audience = audience
        self._leeway = leeway_s
        # a token's SHA-256 -> its claims and until when they stand without a new check
        self._remembered: OrderedDict[bytes, tuple[Claims, float]] = OrderedDict()
        self._remember_s = remember_s
        self._max_remembered = max_remembered
        self._clock = clock
        self.checks = 0  # tokens checked in full (signature and claims), not remembered

    @property
    def remembered(self) -> int:
        return len(self._remembered)

    def good_until(self, claims: Claims) -> float:
        """When (wall clock, `time.time()`) a token with these claims is refused: its
        `exp`, and the leeway given to clocks that differ."""
        return float(claims.exp) + self._leeway

    async def verify(self, token: str) -> Claims:
        """The token's claims. A token that passed is remembered for `remember_s`,
        never past its `exp`: a client sends the same token with every request, and
        PyJWT's check costs 70-120 us of the edge's CPU each time (README: Tokens)."""
        now = self._clock()
        # by digest: a provider's tokens can run to kilobytes, and 10,000 are kept
        key = hashlib.sha256(token.encode()).digest()
        remembered = self._remembered.get(key)
        if remembered is not None:
            claims, until = remembered
            if now < until:
                self._remembered.move_to_end(key)
                return claims
            del self._remembered[key]
        claims = await self._check(token)
        self._remembered[key] = (claims, min(float(claims.exp), now + self._remember_s))
        if len(self._remembered) > self._max_remembered:
            self._remembered.popitem(last=False)
        return claims

    async def _check(self, token: str) -> Claims:
        self.checks += 1
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as err:
            raise InvalidToken("malformed token") from err
        alg = header.get("alg")
        try:
            if alg == "HS256" and self._secret is not None:
                admin_allowed = True
                payload = jwt.decode(
                    token,
                    self._secret,
                    algorithms=["HS256"],
                    leeway=self._leeway,
                    options={"require": ["exp", "sub"]},
                )
            elif alg in ASYMMETRIC and self._jwks is not None:
                kid = header.get("kid")
                if not isinstance(kid, str):
                    raise InvalidToken("the token names no key (kid)")
                key = await self._jwks.get(kid)
                # An identity provider's token is never an admin's, whatever its claims
                # say: where users can set claims of their own, one could name itself
                # admin. Admin tokens are the operator's (`parley token --admin`).
                admin_allowed = False
                payload = jwt.decode(
                    token,
                    key,
                    algorithms=[alg],
                    issuer=self._issuer,
                    audience=self._audience,
                    leeway=self._leeway,
                    options={"require": ["exp", "sub", "iss", "aud"]},
                )
            else:
                raise InvalidToken(f"tokens signed with {alg!r} are not accepted")
        except jwt.ExpiredSignatureError as err:
            raise InvalidToken("token expired") from err
        except jwt.InvalidAudienceError as err:
            raise InvalidToken("token is for another audience") from err
        except jwt.InvalidIssuerError as err:
            raise InvalidToken("token is from another issuer") from err
        except jwt.InvalidSignatureError as err:
            raise InvalidToken("bad signature") from err
        except jwt.MissingRequiredClaimError as err:
            raise InvalidToken(f"token lacks the {err.claim!r} claim") from err
        except jwt.ImmatureSignatureError as err:
            raise InvalidToken("token not valid yet (its nbf or iat is in the future)") from err
        except jwt.PyJWTError as err:
            raise InvalidToken(f"invalid token: {_plain(err)}") from err
        return _claims(payload, admin_allowed=admin_allowed)


def _plain(err: jwt.PyJWTError) -> str:
    """PyJWT's own words for what is wrong ("Subject must be a string"), not the name
    of its exception class."""
    return str(err).rstrip(".") or "it does not pass the checks"


def _claims(payload: dict[str, Any], *, admin_allowed: bool) -> Claims:
    """The claims parley reads, as JSON gives them: no string read as a number and no
    "true", "1" or 1 taken for an admin's `true` (only the JSON value true is one)."""
    admin = admin_allowed and payload.get("adm") is True
    try:
        claims = msgspec.convert(
            {k: v for k, v in payload.items() if k != "adm"}, type=Claims, strict=True
        )
    except msgspec.ValidationError as err:
        raise InvalidToken(f"invalid claims: {err}") from err
    claims = msgspec.structs.replace(claims, adm=admin)
    if not valid_id(claims.sub):
        raise InvalidToken("the token's sub must be 1-128 characters of A-Z a-z 0-9 _ -")
    return claims
