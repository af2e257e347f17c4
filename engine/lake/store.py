"""Object stores: a local directory (the embedded default) and any S3-compatible bucket.

Both verify every upload (size and SHA-256 computed client-side) before reporting success, so a
caller may delete its local copy only after `put_file` returned.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import random
import shutil
import threading
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


class StoreUnavailableError(StoreError):
    """The endpoint did not answer (refused, timed out): retrying now only makes callers wait."""


MULTIPART_THRESHOLD = 64 << 20  # objects this large go up in verified parts
MULTIPART_CHUNK = 16 << 20
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 15.0
BOTO_ATTEMPTS = 3  # botocore's standard retry mode: the one retry layer for transport errors


class Store(Protocol):
    url: str

    def put_file(self, key: str, path: Path, sha256: str) -> None: ...
    def get_file(self, key: str, dest: Path) -> None: ...
    def head(self, key: str) -> tuple[int, str | None] | None: ...
    def delete(self, key: str) -> None: ...
    def put_bytes(self, key: str, data: bytes) -> None: ...
    def get_bytes(self, key: str) -> bytes | None: ...
    def get_bytes_if_changed(self, key: str, etag: str | None) -> tuple[bytes | None, str | None]: ...
    def list_keys(self, prefix: str) -> list[str]: ...
    def list_etags(self, prefix: str) -> dict[str, str]: ...
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

    def get_bytes_if_changed(self, key: str, etag: str | None) -> tuple[bytes | None, str | None]:
        """(data, etag), or (None, etag) when unchanged since `etag`; a missing object raises KeyError."""
        p = self.path(key)
        try:
            st = p.stat()
        except FileNotFoundError:
            raise KeyError(key) from None
        tag = f"{st.st_mtime_ns}-{st.st_size}-{st.st_ino}"
        if tag == etag:
            return None, etag
        return p.read_bytes(), tag

    def list_etags(self, prefix: str) -> dict[str, str]:
        """Every `.parquet` key starting with `prefix` (a string prefix, as S3's), with the tag
        `get_bytes_if_changed` gives it."""
        parent = self.root / prefix if prefix.endswith("/") or not prefix else (self.root / prefix).parent
        out = {}
        if not parent.exists():
            return out
        for p in parent.rglob("*.parquet"):
            key = p.relative_to(self.root).as_posix()
            if key.startswith(prefix) and not p.name.startswith("."):
                try:
                    st = p.stat()
                except FileNotFoundError:
                    continue
                out[key] = f"{st.st_mtime_ns}-{st.st_size}-{st.st_ino}"
        return dict(sorted(out.items()))

    def list_keys(self, prefix: str) -> list[str]:
        base = self.root / prefix
        if not base.exists():
            return []
        return sorted(str(p.relative_to(self.root)) for p in base.rglob("*.parquet") if not p.name.startswith("."))


_CLIENTS: dict[tuple, object] = {}
_CLIENTS_LOCK = threading.Lock()


def _client_for(endpoint_url, key_id: str, secret: str, cfg):
    """One boto3 client per endpoint, credentials and settings in a process (clients are thread-safe,
    and making one costs ~0.1 s: a notebook opening a lake again should not pay it again)."""
    import boto3

    k = (endpoint_url, key_id, hashlib.sha256(secret.encode()).hexdigest(), repr(sorted(cfg._user_provided_options.items())))
    with _CLIENTS_LOCK:
        c = _CLIENTS.get(k)
        if c is None:
            c = _CLIENTS[k] = boto3.session.Session().client(
                "s3", endpoint_url=endpoint_url, aws_access_key_id=key_id, aws_secret_access_key=secret, config=cfg)
        return c


class S3Store:
    """S3-compatible bucket through boto3 (AWS, Backblaze B2, MinIO, moto...)."""

    is_local = False

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None, attempts: int = 3,
                 connect_timeout_s: float | None = None, read_timeout_s: float | None = None, client=None):
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.attempts = attempts  # verification retries only: transport retries are botocore's
        if client is None:
            client = self._client(
                connect_timeout_s or float(os.environ.get("ENGINE_STORE_CONNECT_TIMEOUT_S", CONNECT_TIMEOUT_S)),
                read_timeout_s or float(os.environ.get("ENGINE_STORE_READ_TIMEOUT_S", READ_TIMEOUT_S)))
        self.client = client

    def _client(self, connect_timeout_s: float, read_timeout_s: float):
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
            connect_timeout=connect_timeout_s,
            read_timeout=read_timeout_s,
            retries={"total_max_attempts": BOTO_ATTEMPTS, "mode": "standard"},
            region_name=os.environ.get("AWS_DEFAULT_REGION", os.environ.get("AWS_REGION", "us-east-1")),
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        return _client_for(self.endpoint_url, key_id, secret, cfg)

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
                if status == 404 and not code:  # a LIST or PUT answered by something that is not S3
                    raise StoreError(
                        f"{what} on {self.url}: the endpoint {self.endpoint_url or 'AWS'} answered HTTP 404 without "
                        "an S3 error code; is AWS_ENDPOINT_URL an S3 endpoint (not a proxy or web page)?") from None
                if code in ("NoSuchBucket",):
                    raise StoreConfigError(f"bucket {self.bucket!r} does not exist at {redact(self.endpoint_url or 'AWS')}") from None
                if code not in ("BadDigest", "XAmzContentSHA256Mismatch", "InvalidDigest"):
                    # botocore retried throttling and 5xx already; what is left is an answer
                    cls = StoreUnavailableError if not status or status >= 500 or code in ("SlowDown", "RequestTimeout") else StoreError
                    raise cls(redact(f"{what} on {self.url} failed: {code} (HTTP {status}) {e}")) from None
                err = f"{code} (HTTP {status}): the bytes were damaged on the way"
            except (BotoCoreError, OSError) as e:
                # botocore already retried the transport (standard mode): a second layer here would
                # multiply the wait (5 x 3 x a read timeout was 455 s against a silent endpoint)
                raise StoreUnavailableError(redact(
                    f"{what} on {self.url}: endpoint {self.endpoint_url or 'AWS'} did not answer "
                    f"({type(e).__name__}: {e}); is it up and reachable?")) from None
            except VerificationError as e:
                err = redact(str(e))
            if attempt == self.attempts:
                raise StoreError(f"{what} on {self.url} failed after {attempt} attempts: {err}")
            log.warning("store_retry", what=what, attempt=attempt, error=err)
            time.sleep(delay * (1 + random.random()))
            delay = min(delay * 2, 5.0)

    def put_file(self, key: str, path: Path, sha256: str) -> None:
        size = os.path.getsize(path)
        if size >= MULTIPART_THRESHOLD:
            self._retry(f"upload {key}", lambda: self._put_multipart(key, path, size, sha256))
            return
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

    def _put_multipart(self, key: str, path: Path, size: int, sha256: str) -> None:
        """Parts carry Content-MD5 (checked by the server); the completed object's ETag must be the
        MD5 of the part MD5s, and its size and SHA-256 metadata must match."""
        k = self._k(key)
        up = self.client.create_multipart_upload(Bucket=self.bucket, Key=k, Metadata={"sha256": sha256})
        uid, parts, digests = up["UploadId"], [], []
        try:
            with open(path, "rb") as f:
                n = 0
                while chunk := f.read(MULTIPART_CHUNK):
                    n += 1
                    d = hashlib.md5(chunk).digest()
                    digests.append(d)
                    r = self.client.upload_part(Bucket=self.bucket, Key=k, UploadId=uid, PartNumber=n, Body=chunk,
                                                ContentMD5=base64.b64encode(d).decode())
                    parts.append({"PartNumber": n, "ETag": r["ETag"]})
            self.client.complete_multipart_upload(Bucket=self.bucket, Key=k, UploadId=uid,
                                                  MultipartUpload={"Parts": parts})
        except BaseException:
            with contextlib.suppress(Exception):
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=k, UploadId=uid)
            raise
        got = self.client.head_object(Bucket=self.bucket, Key=k)
        want_etag = f"{hashlib.md5(b''.join(digests)).hexdigest()}-{len(digests)}"
        if (got["ContentLength"], got.get("Metadata", {}).get("sha256"), got.get("ETag", "").strip('"')) != (
                size, sha256, want_etag):
            raise VerificationError(f"multipart upload of {key} did not verify: size {got['ContentLength']}/{size}, "
                                    f"etag {got.get('ETag')}/{want_etag}")

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
        try:
            return self.get_bytes_if_changed(key, None)[0]
        except KeyError:
            return None

    def get_bytes_if_changed(self, key: str, etag: str | None) -> tuple[bytes | None, str | None]:
        """One GET with If-None-Match: an unchanged object costs a 304 and no body. A missing object
        raises KeyError; a 404 that is not S3's (a proxy, a wrong endpoint) raises StoreError."""
        from botocore.exceptions import ClientError

        def do():
            kw = {"IfNoneMatch": etag} if etag else {}
            try:
                r = self.client.get_object(Bucket=self.bucket, Key=self._k(key), **kw)
            except ClientError as e:
                code = e.response.get("Error", {}).get("Code")
                status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if status == 304 or code in ("304", "NotModified"):
                    return None, etag
                if code == "NoSuchKey":
                    raise KeyError(key) from None
                if status == 404:
                    raise StoreError(
                        f"GET {key} on {self.url}: the endpoint {self.endpoint_url or 'AWS'} answered HTTP 404 "
                        f"without an S3 error code ({code!r}); is AWS_ENDPOINT_URL an S3 endpoint (not a proxy "
                        "or web page)?") from None
                raise
            return r["Body"].read(), r.get("ETag")

        return self._retry(f"download {key}", do)

    def list_etags(self, prefix: str) -> dict[str, str]:
        """Every `.parquet` key starting with `prefix`, with its ETag (as a GET returns it)."""
        return dict(self._list(prefix))

    def list_keys(self, prefix: str) -> list[str]:
        return [k for k, _ in self._list(prefix)]

    def _list(self, prefix: str) -> list[tuple[str, str]]:
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
            out += [(o["Key"][strip:], o.get("ETag")) for o in r.get("Contents", []) if o["Key"].endswith(".parquet")]
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


class CacheTooSmallError(StoreError):
    pass


class ReadCache:
    """Bounded local read-through cache of remote objects, verified by SHA-256, LRU by access time.
    Files a running query resolved are pinned: eviction never removes them under the reader."""

    def __init__(self, root: Path, store, max_bytes: int = 2 << 30):
        self.root, self.store, self.max_bytes = Path(root), store, max_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        self._pins: dict[Path, int] = {}  # path -> open pin scopes (all threads)
        self._pin_lock = threading.Lock()
        self._tls = threading.local()  # this thread's open pin scopes
        self._total: int | None = None  # bytes cached, once walked (other processes may add: approximate)

    def path_for(self, sha256: str) -> Path:
        return self.root / sha256[:2] / f"{sha256}.parquet"

    @contextlib.contextmanager
    def pinned(self):
        """Every file `get` returns inside the block stays until the block ends."""
        mine: list[Path] = []
        scopes = self._tls.__dict__.setdefault("scopes", [])
        scopes.append(mine)
        try:
            yield
        finally:
            scopes.remove(mine)
            with self._pin_lock:
                for p in mine:
                    n = self._pins.get(p, 0) - 1
                    if n > 0:
                        self._pins[p] = n
                    else:
                        self._pins.pop(p, None)

    def _pin(self, p: Path) -> None:
        with self._pin_lock:
            for scope in self._tls.__dict__.get("scopes", ()):
                scope.append(p)
                self._pins[p] = self._pins.get(p, 0) + 1

    def check_fits(self, needed: int, what: str) -> None:
        """Refuse up front a read whose remote files cannot all be held at once."""
        if needed > self.max_bytes:
            raise CacheTooSmallError(
                f"{what} needs {needed / 2**20:,.0f} MiB of remote files at once, more than the read cache "
                f"(cache_bytes={self.max_bytes / 2**20:,.0f} MiB). Raise Engine.open(cache_bytes=...), narrow "
                "the query, or use the lazy eng.scan(...) / scan_l2 / scan_trades, which fetch file by file.")

    def get(self, key: str, sha256: str) -> Path:
        """The verified local copy of `key`; a cached copy is hashed the first time this process opens it,
        and a damaged one is dropped and fetched again (the store's object is the truth)."""
        from engine.errors import CorruptFileError
        from engine.lake import integrity

        p = self.path_for(sha256)
        if p.exists():
            try:
                integrity.check_once(p, key, sha256)
                st = p.stat()
                os.utime(p, ns=(time.time_ns(), st.st_mtime_ns))  # LRU by access time; mtime kept
                self._pin(p)
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
        self._pin(p)
        self._evict(keep=p)
        return p

    def discard(self, path: Path) -> bool:
        """Delete a cached copy found damaged, so that the next read fetches the object again."""
        from engine.lake import integrity

        path = Path(path)
        if self.root not in path.parents:
            return False
        integrity.forget(path)
        path.unlink(missing_ok=True)
        return True

    def prefetch(self, wanted: list[tuple[str, str]], workers: int = 8) -> None:
        """Fetch (key, sha256) objects not cached yet, several at a time: a cold read of a day of hourly
        files is bound by round trips, not bandwidth. `get` then finds (and pins) them."""
        from concurrent.futures import ThreadPoolExecutor

        todo = list({sha: key for key, sha in wanted if not self.path_for(sha).exists()}.items())
        if len(todo) > 1:
            with ThreadPoolExecutor(min(workers, len(todo)), thread_name_prefix="cache-fetch") as ex:
                list(ex.map(lambda t: self.get(t[1], t[0]), todo))

    def _evict(self, keep: Path) -> None:
        """Drop least recently used unpinned copies once the cache is over its size. The total is
        kept up to date in memory; the directory is walked only when it may be over."""
        with self._pin_lock:
            if self._total is not None:
                self._total += keep.stat().st_size
                if self._total <= self.max_bytes:
                    return
        files = [(f.stat().st_atime, f.stat().st_size, f) for f in self.root.rglob("*.parquet")]
        total = sum(s for _, s, _ in files)
        for _, size, f in sorted(files):
            if total <= self.max_bytes:
                break
            with self._pin_lock:
                pinned = f in self._pins
            if f != keep and not pinned:
                f.unlink(missing_ok=True)
                total -= size
        with self._pin_lock:
            self._total = total
