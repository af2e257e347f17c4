"""Kalshi API-key request signing (RSA-PSS, SHA-256, MGF1 SHA-256, salt 32) and its verification.

Headers (exchange-protocols §2.2):
  KALSHI-ACCESS-KEY        the API key id
  KALSHI-ACCESS-TIMESTAMP  Unix time in milliseconds, decimal string
  KALSHI-ACCESS-SIGNATURE  base64(RSA-PSS(timestamp + METHOD + path)), path without query string

Key material is never logged or put in exception messages.
"""

from __future__ import annotations

import base64
import binascii
import os
import time
from collections.abc import Mapping
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

HDR_KEY = "KALSHI-ACCESS-KEY"
HDR_TS = "KALSHI-ACCESS-TIMESTAMP"
HDR_SIG = "KALSHI-ACCESS-SIGNATURE"
WS_PATH = "/trade-api/ws/v2"

_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)


class KalshiAuthError(Exception):
    """Raised by `verify_headers` with a reason safe to log (never key material)."""


class KalshiKeyError(ValueError):
    """The private key file cannot be used; the message names the path and the problem, never key material."""

    def __init__(self, path, problem: str):
        super().__init__(f"Kalshi private key {path}: {problem}")
        self.path, self.problem = str(path), problem


def load_private_key(path: str | os.PathLike):
    """Load an RSA private key from a PEM file (unencrypted, PKCS#1 or PKCS#8)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise KalshiKeyError(path, f"cannot be read ({e.strerror or type(e).__name__}); "
                                   "check KALSHI_PRIVATE_KEY_PATH") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise KalshiKeyError(path, "is encrypted; the collector needs an unencrypted PEM private key") from None
    except ValueError:  # cryptography's text may quote parts of the file: not repeated here
        raise KalshiKeyError(path, "is not a PEM private key (expected the RSA key file downloaded from Kalshi, "
                                   "-----BEGIN RSA PRIVATE KEY----- or -----BEGIN PRIVATE KEY-----)") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise KalshiKeyError(path, f"holds a {type(key).__name__.lstrip('_')}, Kalshi needs an RSA private key")
    return key


def load_public_key(path: str | os.PathLike):
    """Load an RSA public key from a PEM file; a private key PEM is accepted too (its public half is used)."""
    data = Path(path).read_bytes()
    if b"PRIVATE KEY" in data:
        return serialization.load_pem_private_key(data, password=None).public_key()
    key = serialization.load_pem_public_key(data)
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError(f"{path}: not an RSA public key")
    return key


def _strip_query(path: str) -> str:
    return path.split("?", 1)[0]


def sign_headers(key_id: str, private_key, method: str, path: str, now_ms: int | None = None) -> dict[str, str]:
    """Return the three Kalshi auth headers for one request (recompute per connection attempt)."""
    ts = str(int(time.time() * 1000) if now_ms is None else int(now_ms))
    msg = (ts + method.upper() + _strip_query(path)).encode()
    sig = private_key.sign(msg, _PSS, hashes.SHA256())
    return {HDR_KEY: key_id, HDR_TS: ts, HDR_SIG: base64.b64encode(sig).decode("ascii")}


def verify_headers(
    headers: Mapping[str, str],
    public_key,
    method: str,
    path: str,
    max_skew_ms: int = 300_000,
    now_ms: int | None = None,
) -> None:
    """Check the Kalshi auth headers are present and well formed, the timestamp is within `max_skew_ms`
    of now and (when `public_key` is given) the signature verifies. Raises KalshiAuthError otherwise."""
    lower = {str(k).lower(): v for k, v in headers.items()}
    key_id = lower.get(HDR_KEY.lower())
    ts = lower.get(HDR_TS.lower())
    sig_b64 = lower.get(HDR_SIG.lower())
    missing = [h for h, v in ((HDR_KEY, key_id), (HDR_TS, ts), (HDR_SIG, sig_b64)) if not v]
    if missing:
        raise KalshiAuthError(f"missing header(s): {', '.join(missing)}")
    if not ts.isdigit() or len(ts) < 12:
        raise KalshiAuthError(f"{HDR_TS} must be Unix milliseconds as a decimal string")
    now = int(time.time() * 1000) if now_ms is None else int(now_ms)
    if max_skew_ms is not None and abs(now - int(ts)) > max_skew_ms:
        raise KalshiAuthError(f"{HDR_TS} is {abs(now - int(ts))} ms away from server time (max {max_skew_ms})")
    try:
        sig = base64.b64decode(sig_b64, validate=True)
    except (binascii.Error, ValueError):
        raise KalshiAuthError(f"{HDR_SIG} is not valid base64") from None
    if not sig:
        raise KalshiAuthError(f"{HDR_SIG} is empty")
    if public_key is None:
        return
    msg = (ts + method.upper() + _strip_query(path)).encode()
    try:
        public_key.verify(sig, msg, _PSS, hashes.SHA256())
    except InvalidSignature:
        raise KalshiAuthError("signature does not verify for this key, timestamp, method and path") from None


def generate_keypair(directory: str | os.PathLike, name: str = "kalshi", bits: int = 2048) -> tuple[Path, Path]:
    """Write a fresh RSA keypair as `<name>-private.pem` (mode 0600) and `<name>-public.pem` into
    `directory` (for tests and the demo); returns (private_path, public_path)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    priv = d / f"{name}-private.pem"
    pub = d / f"{name}-public.pem"
    fd = os.open(priv, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    pub.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return priv, pub
