"""NIfTI volumes and raw bytes at fsspec URLs (local paths, ``s3://``, ...).

Axis order: arrays are D x H x W (slice, depth along the A-scan, width) and are stored in
NIfTI voxel order i, j, k = D, H, W, so nibabel reads them back as D x H x W. Readers that
use the C order of ITK (SimpleITK's ``GetArrayFromImage``) see the same data as W x H x D.
Voxel spacing lives in the affine (mm per voxel along D, H, W on its diagonal).

Every failure becomes a :class:`~caldm.errors.DataError` whose one-line message names the URL:
missing files, unknown URL schemes, S3 credential or endpoint problems, corrupt or truncated
files, wrong dimensionality and non-finite values.

Writes are atomic: a local file is written under a temporary name and renamed into place; an
object store gets one upload of the fully built bytes (S3 never exposes a partial object).
S3 uploads carry a SHA-256 additional checksum, which S3 checks on receipt and keeps with the
object, so :func:`write_verified` can confirm what is stored on any bucket (an ETag is the MD5
only without SSE-KMS or SSE-C, and never for multipart uploads).
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import json
import os
import uuid
import zlib
from collections.abc import Iterator
from typing import Any, Literal

import fsspec
import nibabel as nib
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from caldm.errors import DataError

LabelKind = Literal["layers", "vessels"]
NIFTI_SUFFIXES = (".nii.gz", ".nii")


def split_url(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and the path within it for ``url``; DataError on an unknown scheme."""
    try:
        return fsspec.core.url_to_fs(url)
    except (ValueError, ImportError) as exc:
        scheme = url.split("://", 1)[0] if "://" in url else url
        raise DataError(url, f"unknown URL scheme {scheme!r} ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


@contextlib.contextmanager
def storage_errors(url: str) -> Iterator[None]:
    """Turn filesystem, S3 credential and endpoint errors into one-line DataErrors naming url."""
    try:
        yield
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(url, "file not found") from None
    except IsADirectoryError:
        raise DataError(url, "is a directory, expected a file") from None
    except PermissionError as exc:
        raise DataError(url, f"access denied ({_first_line(exc)})") from None
    except Exception as exc:  # botocore errors have no common base we can import cheaply
        name = type(exc).__name__
        if name == "NoCredentialsError" or "credentials" in str(exc).lower():
            raise DataError(
                url,
                "no S3 credentials: give this machine an instance profile, a shared "
                "credentials file (AWS_SHARED_CREDENTIALS_FILE) or AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY",
            ) from None
        if name in ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError"):
            problem = f"cannot reach the storage endpoint ({_first_line(exc)})"
            raise DataError(url, problem) from None
        if isinstance(exc, OSError) or type(exc).__module__.startswith(("botocore", "aiohttp")):
            raise DataError(url, f"storage error: {name}: {_first_line(exc)}") from None
        raise


def read_bytes(url: str) -> bytes:
    """All bytes of the file at ``url``."""
    fs, path = split_url(url)
    with storage_errors(url):
        return fs.cat_file(path)


# The largest single PUT S3 accepts; larger objects go up in parts.
_MAX_PUT = 5 * 2**30


def _is_s3(fs: fsspec.AbstractFileSystem) -> bool:
    return "s3" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def sha256_b64(data: bytes) -> str:
    """The base64 SHA-256 of ``data``, as S3 additional checksums carry it."""
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def write_bytes(url: str, data: bytes) -> None:
    """Write ``data`` to ``url`` atomically (temp file + rename locally, one upload remotely).

    Local temp names are unique (``.<name>.<hex>.tmp``): concurrent writers of one file never
    share a temp file, the last rename wins whole. On S3 the upload carries its SHA-256
    (``ChecksumAlgorithm=SHA256``): S3 rejects a body that arrives different.
    """
    fs, path = split_url(url)
    with storage_errors(url):
        if isinstance(fs, LocalFileSystem):
            directory = os.path.dirname(path) or "."
            os.makedirs(directory, exist_ok=True)
            tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
            try:
                with open(tmp, "wb") as fh:
                    fh.write(data)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        elif _is_s3(fs) and len(data) < _MAX_PUT:
            # One PutObject (chunksize above the size: s3fs would otherwise go multipart).
            fs.pipe_file(path, data, chunksize=_MAX_PUT, ChecksumAlgorithm="SHA256",
                         ChecksumSHA256=sha256_b64(data))  # fmt: skip
        else:
            # A multipart upload (or another store's write): only appears when completed.
            fs.pipe_file(path, data)


def write_verified(url: str, data: bytes) -> dict[str, Any]:
    """Write ``data`` atomically, then check what the store holds; returns {"bytes", "sha256"}.

    The size is read back everywhere. On S3 the object's stored SHA-256 checksum is compared
    with the bytes written; a store that keeps none falls back to the ETag where it is the MD5
    (no SSE-KMS or SSE-C, single part) and else to reading the object back. Raises DataError
    naming ``url`` on a mismatch.
    """
    write_bytes(url, data)
    fs, path = split_url(url)
    digest = hashlib.sha256(data).hexdigest()
    with storage_errors(url):
        fs.invalidate_cache(path)
        if not _is_s3(fs):
            size = int(fs.info(path).get("size") or 0)
            if size != len(data):
                raise DataError(url, f"verification failed: {size} bytes, wrote {len(data)}")
            return {"bytes": len(data), "sha256": digest}
        bucket, key, _ = fs.split_path(path)
        head = fs.call_s3("head_object", Bucket=bucket, Key=key, ChecksumMode="ENABLED")
        if int(head.get("ContentLength", -1)) != len(data):
            raise DataError(
                url, f"verification failed: {head.get('ContentLength')} bytes, wrote {len(data)}"
            )
        stored = head.get("ChecksumSHA256")
        etag = str(head.get("ETag") or "").strip('"')
        encrypted = head.get("ServerSideEncryption") == "aws:kms" or head.get(
            "SSECustomerAlgorithm"
        )
        if stored:
            same = stored == sha256_b64(data)
        elif etag and "-" not in etag and not encrypted:
            same = etag == hashlib.md5(data).hexdigest()
        else:
            same = hashlib.sha256(fs.cat_file(path)).hexdigest() == digest
    if not same:
        raise DataError(url, "verification failed: the stored object differs from the bytes sent")
    return {"bytes": len(data), "sha256": digest}


def read_json(url: str) -> dict[str, Any] | None:
    """The JSON object at ``url``; None when there is no file. DataError when unreadable."""
    fs, path = split_url(url)
    with storage_errors(url):
        try:
            raw = fs.cat_file(path)
        except FileNotFoundError:
            return None
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(url, f"not valid JSON ({_first_line(exc)})") from None


def write_json(url: str, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``url``, atomically (see :func:`write_bytes`)."""
    write_bytes(url, json.dumps(obj, indent=1).encode())


def join_url(url: str, *parts: str) -> str:
    """``url`` and ``parts`` joined with single slashes (local paths and URLs alike)."""
    return "/".join([url.rstrip("/"), *(p.strip("/") for p in parts if p)])


def url_exists(url: str) -> bool:
    """Whether a file or directory exists at ``url``."""
    fs, path = split_url(url)
    with storage_errors(url):
        return bool(fs.exists(path))


def list_dir(url: str) -> list[str]:
    """Names (not paths) of the entries directly under ``url``; [] if it does not exist.

    On object stores this is one listing request; nothing is downloaded.
    """
    fs, path = split_url(url)
    with storage_errors(url):
        fs.invalidate_cache(path)  # other writers (jobs, workers) may have added files
        if not fs.exists(path):
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))


def nifti_stem(name: str) -> str | None:
    """``"a.nii.gz"`` -> ``"a"``; None for names that are not NIfTI files."""
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def _decode_nifti(url: str, raw: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Parse NIfTI bytes (gzip detected by its magic, whatever the suffix) to (array, affine)."""
    try:
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as exc:
        raise DataError(url, f"corrupt or truncated gzip data ({_first_line(exc)})") from None
    try:
        img: Any = nib.Nifti1Image.from_bytes(raw)
    except Exception:
        try:
            img = nib.Nifti2Image.from_bytes(raw)
        except Exception as exc:
            raise DataError(url, f"not a NIfTI file ({_first_line(exc)})") from None
    try:
        # asanyarray applies scl_slope/inter when set; otherwise the stored dtype is kept.
        array = np.asanyarray(img.dataobj)
    except Exception as exc:
        raise DataError(url, f"truncated or corrupt voxel data ({_first_line(exc)})") from None
    # No copy to C order: NIfTI is Fortran-ordered on disk and transposing a 512^3 volume
    # costs seconds; numpy and torch.from_numpy handle the strides.
    return array, np.asarray(img.affine, dtype=np.float64)


def _check_values(url: str, array: np.ndarray) -> None:
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise DataError(url, "contains NaN or Inf values")


def _drop_trailing_singletons(array: np.ndarray, ndim: int) -> np.ndarray:
    while array.ndim > ndim and array.shape[-1] == 1:
        array = array[..., 0]
    return array


def read_volume(url: str) -> tuple[np.ndarray, np.ndarray]:
    """Read a 3D NIfTI volume: (array D x H x W in its stored dtype, 4x4 affine).

    The array is usually Fortran-ordered (NIfTI's on-disk order, no copy); call
    ``np.ascontiguousarray`` where C order matters.
    A trailing singleton dimension (D x H x W x 1) is dropped. Raises DataError naming ``url``
    for a missing, corrupt or truncated file, another number of dimensions, or NaN/Inf.
    """
    array, affine = _decode_nifti(url, read_bytes(url))
    array = _drop_trailing_singletons(array, 3)
    if array.ndim != 3:
        raise DataError(url, f"expected a 3D volume D x H x W, got shape {array.shape}")
    _check_values(url, array)
    return array, affine


def read_label(
    url: str,
    kind: LabelKind,
    expect_shape: tuple[int, int, int] | None = None,
    with_spacing: bool = False,
) -> Any:
    """Read a label map as uint8; with ``with_spacing``: ``(array, mm per voxel of each axis)``.

    ``layers``: D x H x W, one class per voxel. ``vessels``: the en-face map D x W
    (0 background, 1 artery, 2 vein), stored as a 2D NIfTI; a D x 1 x W volume is accepted too.
    ``expect_shape`` is the image's D x H x W; a label that does not match it is a DataError.
    Voxel sizes and checks against a model: :mod:`caldm.data.labels`.
    """
    array, affine = _decode_nifti(url, read_bytes(url))
    _check_values(url, array)
    sizes = [float(z) for z in nib.affines.voxel_sizes(affine)]
    if kind == "layers":
        array = _drop_trailing_singletons(array, 3)
        want = expect_shape
    elif kind == "vessels":
        array = _drop_trailing_singletons(array, 2)
        if array.ndim == 3 and array.shape[1] == 1:
            array = array[:, 0, :]
            sizes = [sizes[0], sizes[2]]
        want = (expect_shape[0], expect_shape[2]) if expect_shape is not None else None
    else:
        raise DataError(url, f"unknown label kind {kind!r}; expected 'layers' or 'vessels'")
    ndim = 3 if kind == "layers" else 2
    if array.ndim != ndim:
        raise DataError(url, f"expected a {ndim}D {kind} label, got shape {array.shape}")
    if want is not None and tuple(array.shape) != tuple(want):
        raise DataError(
            url, f"{kind} label shape {array.shape} does not match the image (expected {want})"
        )
    if array.dtype != np.uint8:
        if array.size and (array.min() < 0 or array.max() > 255 or np.any(array % 1)):
            raise DataError(url, f"{kind} label values must be integers in 0..255")
        array = array.astype(np.uint8)
    return (array, tuple(sizes[: array.ndim])) if with_spacing else array


def encode_nifti(array: np.ndarray, affine: np.ndarray | None = None, gz: bool = True) -> bytes:
    """NIfTI-1 bytes of ``array`` in its own dtype (uint8 stays uint8), gzip level 1 if ``gz``."""
    array = np.asarray(array)
    if array.dtype == np.float64:
        array = array.astype(np.float32)
    img = nib.Nifti1Image(array, np.eye(4) if affine is None else np.asarray(affine))
    img.header.set_data_dtype(array.dtype)
    img.header.set_xyzt_units("mm")
    raw = img.to_bytes()
    # Level 1: OCT speckle barely compresses better at higher levels, which are 3-5x slower.
    return gzip.compress(raw, compresslevel=1, mtime=0) if gz else raw


def write_volume(url: str, array: np.ndarray, affine: np.ndarray | None = None) -> None:
    """Write ``array`` (any ndim; D x H x W for volumes) as NIfTI at ``url``, atomically.

    ``.nii.gz`` is gzip-compressed, ``.nii`` is not. uint8 stays uint8 on disk; float64 is
    stored as float32. ``affine`` (default identity) carries the voxel spacing.
    """
    if nifti_stem(url.rsplit("/", 1)[-1]) is None:
        raise DataError(url, "expected a .nii or .nii.gz file name")
    write_bytes(url, encode_nifti(array, affine, gz=url.endswith(".gz")))


def spacing_affine(spacing: tuple[float, float, float]) -> np.ndarray:
    """A 4x4 affine with ``spacing`` (mm along D, H, W) on its diagonal."""
    return np.diag([*map(float, spacing), 1.0])
