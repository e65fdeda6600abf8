"""A model folder on a device: the delivered files, their manifest, installed atomically, checked before use.

    MODEL_DIR/current/manifest.json        what is installed: run, round, dataset, input shape, class
    MODEL_DIR/current/student.onnx ...     names, preprocessing, the server's test accuracy of each
    MODEL_DIR/previous/                    model and the SHA-256 and size of each file; the version
                                           ``current`` replaced (one rollback step)

:func:`install` writes a delivery into a temporary folder next to ``current``,
checks every file against the manifest, then renames the old ``current`` to
``previous`` and the new folder to ``current``: a reader sees the old model, no
model for the instant between two renames (and is told so), or the new model,
never half of one. A write that fails (read-only folder, full disk) leaves
``current`` and ``previous`` as they were. :func:`verify` is what a reader calls
first (``fl-distill-predict``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

MANIFEST = "manifest.json"
CURRENT, PREVIOUS = "current", "previous"
# (x / 255 - 0.5) / 0.5 after resizing to the input shape: common/data.py's standardize, as every loader does.
PREPROCESSING = {"resize": "to the input shape (antialiased)", "scale": "pixel / 255",
                 "normalize": "(x - 0.5) / 0.5", "channels": "grayscale for 1, RGB for 3; alpha onto white"}


class ModelPackageError(RuntimeError):
    """A model folder that cannot be installed or used; the message names the folder or file and the cause."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe_files(files: Mapping[str, bytes]) -> dict[str, dict]:
    """The manifest's ``files`` entry: {file name: {"sha256", "bytes"}}."""
    return {name: {"sha256": sha256(data), "bytes": len(data)} for name, data in files.items()}


def install(model_dir: Path, files: Mapping[str, bytes], manifest: Mapping) -> Path:
    """Install ``files`` with ``manifest`` as ``model_dir/current``; the replaced version becomes ``previous``.

    ``manifest["files"]`` must describe ``files`` (:func:`describe_files`). Returns the installed folder.

    Raises:
        ModelPackageError: naming the folder and the cause (cannot create or write it, disk full, a file
            that does not match the manifest); what was installed before is left as it was.
    """
    model_dir = Path(model_dir)
    if set(manifest.get("files", {})) != set(files):
        raise ModelPackageError(f"delivery to {model_dir}: the manifest lists {sorted(manifest.get('files', {}))} "
                                f"but the files are {sorted(files)}")
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
        incoming = Path(tempfile.mkdtemp(prefix=".incoming-", dir=model_dir))
    except OSError as err:
        raise ModelPackageError(f"cannot write the model folder {model_dir}: {err.strerror or err}") from None
    try:
        for name, data in {**files, MANIFEST: json.dumps(manifest, indent=2).encode()}.items():
            with (incoming / name).open("wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        verify(incoming)
    except (OSError, ModelPackageError) as err:
        shutil.rmtree(incoming, ignore_errors=True)
        cause = err.strerror if isinstance(err, OSError) and err.strerror else err
        raise ModelPackageError(f"cannot install into {model_dir}: {cause}; the installed model is unchanged") from None
    current, previous = model_dir / CURRENT, model_dir / PREVIOUS
    try:
        if previous.is_dir() and not previous.is_symlink():
            shutil.rmtree(previous)
        elif previous.exists() or previous.is_symlink():
            previous.unlink()
        if current.exists():
            current.rename(previous)
        incoming.rename(current)
    except OSError as err:
        shutil.rmtree(incoming, ignore_errors=True)
        if previous.is_dir() and not current.exists():  # the old version was moved aside: put it back
            previous.rename(current)
        raise ModelPackageError(f"cannot install into {model_dir}: moving {err.filename} aside failed: "
                                f"{err.strerror or err}") from None
    return current


def installed(model_dir: Path) -> Path:
    """The folder holding the manifest: ``model_dir/current``, or ``model_dir`` itself if it holds one.

    Raises:
        ModelPackageError: when neither holds a manifest (nothing installed, or an update is in progress).
    """
    model_dir = Path(model_dir)
    for folder in (model_dir / CURRENT, model_dir):
        if (folder / MANIFEST).is_file():
            return folder
    raise ModelPackageError(f"no installed model in {model_dir}: neither {model_dir / CURRENT / MANIFEST} nor "
                            f"{model_dir / MANIFEST} exists (nothing delivered yet, or an update is in progress: "
                            "try again in a moment)")


def verify(folder: Path) -> dict:
    """The manifest of ``folder``, once every file it lists exists with its size and SHA-256.

    Raises:
        ModelPackageError: naming the manifest or the first file that is missing, truncated or changed.
    """
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
        listed = dict(manifest["files"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ModelPackageError(f"{path} is missing or not a manifest ({err})") from None
    for name, expected in listed.items():
        file = Path(folder) / name
        if not file.is_file():
            raise ModelPackageError(f"{file} is listed in {path} but missing")
        if file.stat().st_size != expected["bytes"]:
            raise ModelPackageError(f"{file} has {file.stat().st_size} bytes, the manifest says {expected['bytes']} "
                                    "(truncated or replaced)")
        if file_sha256(file) != expected["sha256"]:
            raise ModelPackageError(f"{file} does not match its SHA-256 in {path} (changed since delivery)")
    return manifest
