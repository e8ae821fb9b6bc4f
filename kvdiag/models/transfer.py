"""Move a registered offline model to a machine without internet: export its GGUF as checked parts,
import them there into the model cache.

    kvdiag models export qwen2.5-coder-0.5b /media/usb --part-mib 60   # on a machine with the model
    kvdiag models import /media/usb                                     # on the offline machine
    # now load_model("qwen2.5-coder-0.5b") works there without a network

What travels is the assembled GGUF file, not the converted safetensors checkpoint: the GGUF is the
quantized original (smollm2-135m: 94 MiB; its de-quantized float32 checkpoint: 517 MiB), it is what
the registry's pinned SHA-256 checks, and the import converts it exactly as a normal fetch does.
An export directory holds, per model:

- `NAME.part000`, `NAME.part001`, ...: the GGUF file cut into parts of at most `--part-mib` MiB;
- `NAME.manifest.json`: {"format", "model", "file", "size", "sha256" (of the whole file), "parts":
  [{"name", "size", "sha256"}, ...], "kvdiag_version"}; written last, so an export that stopped
  half-way has no manifest and is never imported.

The import checks every part's size and SHA-256, then the whole file's against the manifest and the
registry, assembles it in a temporary file beside the cache entry and renames it into place.

The cache (`$KVDIAG_CACHE`, default `~/.cache/kvdiag/models`) is a plain folder: copying it to the
same path on another machine (or pointing `KVDIAG_CACHE` at the copy) works as well.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

from kvdiag.errors import KvdiagError, unknown_name_error
from kvdiag.models.offline import _sha256, ensure_offline_model, fetch_gguf, gguf_path
from kvdiag.models.registry import OFFLINE_MODELS

log = logging.getLogger(__name__)

EXPORT_FORMAT = "kvdiag-model-export/1"
MANIFEST_SUFFIX = ".manifest.json"
DEFAULT_PART_MIB = 60.0
MIB = 1 << 20
_BLOCK = 1 << 20


def _offline_entry(name: str):
    if name not in OFFLINE_MODELS:
        raise unknown_name_error(
            "offline model (only these can be exported or imported)", name, OFFLINE_MODELS
        )
    return OFFLINE_MODELS[name]


def _write_atomically(path: Path, chunks) -> tuple[int, str]:
    """Write the byte chunks to `path` via a temporary file + rename; returns (size, SHA-256)."""
    digest, size = hashlib.sha256(), 0
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
                digest.update(chunk)
                size += len(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; use what open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return size, digest.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _read_span(f, length: int):
    while length > 0:
        block = f.read(min(_BLOCK, length))
        if not block:
            return
        length -= len(block)
        yield block


def export_model(name: str, dest, part_mib: float = DEFAULT_PART_MIB) -> Path:
    """Write the GGUF of offline model `name` into `dest` as parts of at most `part_mib` MiB plus
    `NAME.manifest.json` (see the module docstring). The GGUF comes from the cache, or is fetched
    (and checked) first. Returns the manifest's path."""
    from kvdiag import __version__

    entry = _offline_entry(name)
    if isinstance(part_mib, bool) or not isinstance(part_mib, int | float) or not part_mib > 0:
        raise KvdiagError(f"--part-mib must be a positive number of MiB, got {part_mib!r}")
    part_bytes = max(1, int(part_mib * MIB))
    dest = Path(dest).expanduser()
    if dest.exists() and not dest.is_dir():
        raise KvdiagError(f"export directory {dest} is a file")
    source = fetch_gguf(name)  # checks the pinned SHA-256 (fetches only when the cache lacks it)
    total = source.stat().st_size
    count = max(1, -(-total // part_bytes))
    if count > 1000:
        raise KvdiagError(
            f"--part-mib {part_mib} would cut {name} ({total} bytes) into {count} parts; at most 1000"
        )
    dest.mkdir(parents=True, exist_ok=True)
    (dest / f"{name}{MANIFEST_SUFFIX}").unlink(missing_ok=True)  # an old manifest never outlives its parts
    for stale in dest.glob(f"{name}.part[0-9][0-9][0-9]"):
        stale.unlink()
    parts = []
    with source.open("rb") as f:
        for index in range(count):
            part = dest / f"{name}.part{index:03d}"
            size, digest = _write_atomically(part, _read_span(f, part_bytes))
            parts.append({"name": part.name, "size": size, "sha256": digest})
    manifest = {
        "format": EXPORT_FORMAT, "model": name, "file": source.name, "size": total, "sha256": entry.sha256,
        "parts": parts, "kvdiag_version": __version__,
    }  # fmt: skip
    path = dest / f"{name}{MANIFEST_SUFFIX}"
    _write_atomically(path, [(json.dumps(manifest, indent=1) + "\n").encode()])
    log.info("exported %s (%d bytes) as %d parts into %s", name, total, count, dest)
    return path


def _read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise KvdiagError(f"cannot read export manifest {path}: {err}") from None
    missing = [k for k in ("format", "model", "size", "sha256", "parts") if k not in manifest]
    if missing or manifest.get("format") != EXPORT_FORMAT:
        raise KvdiagError(
            f"{path} is not a kvdiag model export manifest (format {manifest.get('format')!r}, "
            f"expected {EXPORT_FORMAT!r}; missing keys: {missing or 'none'})"
        )
    return manifest


def _verified_parts(src: Path, manifest: dict):
    """Yield the bytes of every part in order, each checked against its size and SHA-256 first."""
    for part in manifest["parts"]:
        path = src / part["name"]
        if not path.is_file():
            raise KvdiagError(f"part {part['name']} of {manifest['model']} is missing from {src}")
        size = path.stat().st_size
        if size != part["size"]:
            raise KvdiagError(
                f"part {part['name']} of {manifest['model']} has {size} bytes, the manifest says {part['size']}"
            )
        digest = _sha256(path)
        if digest != part["sha256"]:
            raise KvdiagError(
                f"part {part['name']} of {manifest['model']} is corrupt: SHA-256 {digest}, "
                f"the manifest says {part['sha256']}"
            )
        with path.open("rb") as f:
            yield from iter(lambda f=f: f.read(_BLOCK), b"")


def import_model(src, name: str | None = None, convert: bool = True) -> Path:
    """Import the export of model `name` (None: the only one in `src`) into the cache: verify, assemble
    atomically, and (convert=True) convert it to safetensors as a normal fetch would. Returns the
    cached GGUF path."""
    src = Path(src).expanduser()
    if not src.is_dir():
        raise KvdiagError(f"import directory {src} does not exist")
    manifests = sorted(src.glob(f"*{MANIFEST_SUFFIX}"))
    if name is None:
        if len(manifests) != 1:
            found = ", ".join(p.name[: -len(MANIFEST_SUFFIX)] for p in manifests) or "none"
            raise KvdiagError(
                f"{src} holds {len(manifests)} model exports ({found}); name the model to import"
            )
        path = manifests[0]
    else:
        path = src / f"{name}{MANIFEST_SUFFIX}"
        if not path.exists():
            found = [p.name[: -len(MANIFEST_SUFFIX)] for p in manifests]
            raise unknown_name_error(f"model export in {src}", name, found)
    manifest = _read_manifest(path)
    model = manifest["model"]
    entry = _offline_entry(model)
    if manifest["sha256"] != entry.sha256:
        raise KvdiagError(
            f"{path.name}: the export's SHA-256 {manifest['sha256']} is not the registered {model}'s "
            f"{entry.sha256} (exported by another kvdiag version?)"
        )
    target = gguf_path(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.close(fd)
    try:
        size, digest = _write_atomically(Path(tmp), _verified_parts(src, manifest))
        if size != manifest["size"] or digest != entry.sha256:
            raise KvdiagError(
                f"the parts of {model} assemble to {size} bytes with SHA-256 {digest}; expected "
                f"{manifest['size']} bytes with SHA-256 {entry.sha256}"
            )
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    log.info("imported %s into %s", model, target)
    if convert:
        ensure_offline_model(model)
    return target
