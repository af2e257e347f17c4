"""Object stores: a local directory (the embedded default) and any S3-compatible bucket.

Both verify every upload (size and SHA-256 computed client-side) before reporting success, so a
caller may delete its local copy only after `put_file` returned.
"""

from __future__ import annotations

import base64
import hashlib
import os
import random
import shutil
import time
from pathlib import Path
from typing import Protocol

from engine.fsio import atomic_path, fsync_dir, sha256_file
from engine.log import get_logger, redact

log = get_logger(component="store")


class StoreError(RuntimeError):
    pass


class StoreConfigError(StoreError):
    pass


class VerificationError(StoreError):
    pass


class Store(Protocol):
    url: str

    def put_file(self, key: str, path: Path, sha256: str) -> None: ...
    def get_file(self, key: str, dest: Path) -> None: ...
    def head(self, key: str) -> tuple[int, str | None] | None: ...
    def delete(self, key: str) -> None: ...
    def put_bytes(self, key: str, data: bytes) -> None: ...
    def get_bytes(self, key: str) -> bytes | None: ...
    def list_keys(self, prefix: str) -> list[str]: ...
    @property
    def is_local(self) -> bool: ...


def _md5_b64(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return base64.b64encode(h.digest()).decode()


class LocalStore:
    """A directory laid out exactly like the bucket."""

    is_local = True

    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = str(self.root)

    def path(self, key: str) -> Path:
        return self.root / key

    def put_file(self, key: str, path: Path, sha256: str) -> None:
        dest = self.path(key)
        with atomic_path(dest) as tmp:
            shutil.copyfile(path, tmp)
            got = sha256_file(tmp)
            if got != sha256 or os.path.getsize(tmp) != os.path.getsize(path):
                raise VerificationError(f"upload of {key} to {self.url} did not verify (sha256 {got} != {sha256})")

    def get_file(self, key: str, dest: Path) -> None:
        src = self.path(key)
        if not src.exists():
            raise StoreError(f"{key} not found in store {self.url}")
        with atomic_path(dest) as tmp:
            shutil.copyfile(src, tmp)

    def head(self, key: str):
        p = self.path(key)
        if not p.exists():
            return None
        return p.stat().st_size, None

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def put_bytes(self, key: str, data: bytes) -> None:
        from engine.fsio import atomic_write_bytes

        atomic_write_bytes(self.path(key), data)

    def get_bytes(self, key: str) -> bytes | None:
        p = self.path(key)
        return p.read_bytes() if p.exists() else None

    def list_keys(self, prefix: str) -> list[str]:
        base = self.root / prefix
        if not base.exists():
            return []
        return sorted(str(p.relative_to(self.root)) for p in base.rglob("*.parquet") if not p.name.startswith("."))


class S3Store:
    """S3-compatible bucket through boto3 (AWS, Backblaze B2, MinIO, moto...)."""

    is_local = False

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None, attempts: int = 5,
                 timeout_s: float = 10.0, client=None):
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.attempts = attempts
        if client is None:
            client = self._client(timeout_s)
        self.client = client

    def _client(self, timeout_s: float):
        import boto3
        from botocore.config import Config

        key_id = os.environ.get("AWS_ACCESS_KEY_ID")
        secret = os.environ.get("AWS_SECRET_ACCESS_KEY")
        if not key_id or not secret:
            missing = [n for n, v in (("AWS_ACCESS_KEY_ID", key_id), ("AWS_SECRET_ACCESS_KEY", secret)) if not v]
            raise StoreConfigError(
                f"store {self.url} needs credentials: set {' and '.join(missing)} "
                "(and AWS_ENDPOINT_URL for a non-AWS endpoint such as Backblaze B2)"
            )
        cfg = Config(
            connect_timeout=timeout_s,
            read_timeout=timeout_s * 3,
            retries={"max_attempts": 2, "mode": "standard"},
            region_name=os.environ.get("AWS_DEFAULT_REGION", os.environ.get("AWS_REGION", "us-east-1")),
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        return boto3.session.Session().client("s3", endpoint_url=self.endpoint_url, config=cfg)

    def _k(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _retry(self, what: str, fn):
        from botocore.exceptions import BotoCoreError, ClientError

        delay = 0.2
        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except ClientError as e:
                code = e.response.get("Error", {}).get("Code", "")
                status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
                if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"):
                    raise StoreConfigError(
                        f"{what} on {self.url} refused ({code}): check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
                    ) from None
                if code in ("NoSuchBucket",):
                    raise StoreConfigError(f"bucket {self.bucket!r} does not exist at {redact(self.endpoint_url or 'AWS')}") from None
                if status and status < 500 and code not in ("RequestTimeout", "SlowDown", "BadDigest", "XAmzContentSHA256Mismatch"):
                    raise StoreError(redact(f"{what} on {self.url} failed: {code} {e}")) from None
                err = f"{code} (HTTP {status})"
            except (BotoCoreError, OSError) as e:
                err = redact(f"{type(e).__name__}: {e}")
            except VerificationError as e:
                err = redact(str(e))
            if attempt == self.attempts:
                raise StoreError(f"{what} on {self.url} failed after {attempt} attempts: {err}")
            log.warning("store_retry", what=what, attempt=attempt, error=err)
            time.sleep(delay * (1 + random.random()))
            delay = min(delay * 2, 5.0)

    def put_file(self, key: str, path: Path, sha256: str) -> None:
        size = os.path.getsize(path)
        md5 = _md5_b64(path)

        def do():
            with open(path, "rb") as f:
                self.client.put_object(
                    Bucket=self.bucket, Key=self._k(key), Body=f, ContentLength=size, ContentMD5=md5,
                    Metadata={"sha256": sha256},
                )
            got = self.client.head_object(Bucket=self.bucket, Key=self._k(key))
            rsize, rsha = got["ContentLength"], got.get("Metadata", {}).get("sha256")
            if rsize != size or rsha != sha256:
                raise VerificationError(f"upload of {key} did not verify: size {rsize}/{size}, sha256 {rsha}/{sha256}")

        self._retry(f"upload {key}", do)

    def get_file(self, key: str, dest: Path) -> None:
        def do():
            with atomic_path(dest) as tmp:
                self.client.download_file(self.bucket, self._k(key), str(tmp))

        self._retry(f"download {key}", do)

    def head(self, key: str):
        from botocore.exceptions import ClientError

        def do():
            try:
                r = self.client.head_object(Bucket=self.bucket, Key=self._k(key))
            except ClientError as e:
                if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                    return None
                raise
            return r["ContentLength"], r.get("Metadata", {}).get("sha256")

        return self._retry(f"head {key}", do)

    def delete(self, key: str) -> None:
        self._retry(f"delete {key}", lambda: self.client.delete_object(Bucket=self.bucket, Key=self._k(key)))

    def put_bytes(self, key: str, data: bytes) -> None:
        sha = hashlib.sha256(data).hexdigest()
        md5 = base64.b64encode(hashlib.md5(data).digest()).decode()
        self._retry(
            f"upload {key}",
            lambda: self.client.put_object(Bucket=self.bucket, Key=self._k(key), Body=data, ContentMD5=md5,
                                           Metadata={"sha256": sha}),
        )

    def get_bytes(self, key: str) -> bytes | None:
        from botocore.exceptions import ClientError

        def do():
            try:
                return self.client.get_object(Bucket=self.bucket, Key=self._k(key))["Body"].read()
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    return None
                raise

        return self._retry(f"download {key}", do)

    def list_keys(self, prefix: str) -> list[str]:
        out = []
        pfx = self._k(prefix)
        strip = len(self.prefix) + 1 if self.prefix else 0

        def page(token):
            kw = {"Bucket": self.bucket, "Prefix": pfx}
            if token:
                kw["ContinuationToken"] = token
            return self.client.list_objects_v2(**kw)

        token = None
        while True:
            r = self._retry(f"list {prefix}", lambda: page(token))
            out += [o["Key"][strip:] for o in r.get("Contents", []) if o["Key"].endswith(".parquet")]
            if not r.get("IsTruncated"):
                return sorted(out)
            token = r["NextContinuationToken"]


def open_store(url: str | os.PathLike | None, default_root: Path) -> LocalStore | S3Store:
    """`s3://bucket/prefix` → S3Store; a path or file:// URL → LocalStore; None → $ENGINE_STORE or the home's store/."""
    if url is None:
        url = os.environ.get("ENGINE_STORE") or None
    if url is None:
        return LocalStore(default_root)
    url = str(url)
    if url.startswith("s3://"):
        rest = url[5:]
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise StoreConfigError(f"store URL {url!r} has no bucket; use s3://bucket/prefix")
        return S3Store(bucket, prefix)
    if url.startswith("file://"):
        url = url[7:]
    if "://" in url:
        raise StoreConfigError(f"unsupported store URL {url!r}; use a directory path or s3://bucket/prefix")
    return LocalStore(Path(url))


class ReadCache:
    """Bounded local read-through cache of remote objects, verified by SHA-256, LRU by access time."""

    def __init__(self, root: Path, store, max_bytes: int = 2 << 30):
        self.root, self.store, self.max_bytes = Path(root), store, max_bytes
        self.root.mkdir(parents=True, exist_ok=True)

    def get(self, key: str, sha256: str) -> Path:
        """The verified local copy of `key`; a cached copy is hashed the first time this process opens it,
        and a damaged one is dropped and fetched again (the store's object is the truth)."""
        from engine import integrity
        from engine.errors import CorruptFileError

        p = self.root / sha256[:2] / f"{sha256}.parquet"
        if p.exists():
            try:
                integrity.check_once(p, key, sha256)
                st = p.stat()
                os.utime(p, ns=(time.time_ns(), st.st_mtime_ns))  # LRU by access time; mtime kept
                return p
            except CorruptFileError as err:
                log.warning("cache_copy_corrupt", key=key, path=str(p), error=str(err), action="fetching again")
                self.discard(p)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(".part")
        self.store.get_file(key, tmp)
        got = sha256_file(tmp)
        if got != sha256:
            tmp.unlink(missing_ok=True)
            raise VerificationError(f"{key} from {self.store.url} has sha256 {got}, catalog says {sha256}")
        os.replace(tmp, p)
        fsync_dir(p.parent)
        integrity.mark_checked(p, sha256)
        self._evict(keep=p)
        return p

    def discard(self, path: Path) -> bool:
        """Delete a cached copy found damaged, so that the next read fetches the object again."""
        from engine import integrity

        path = Path(path)
        if self.root not in path.parents:
            return False
        integrity.forget(path)
        path.unlink(missing_ok=True)
        return True

    def _evict(self, keep: Path) -> None:
        files = [(f.stat().st_atime, f.stat().st_size, f) for f in self.root.rglob("*.parquet")]
        total = sum(s for _, s, _ in files)
        for _, size, f in sorted(files):
            if total <= self.max_bytes:
                break
            if f != keep:
                f.unlink(missing_ok=True)
                total -= size
