"""`kvdiag models export|import`: parts and SHA-256s checked with hashlib on a small fake offline entry,
every corruption a clear error that leaves the cache untouched, the CLI, and the real smollm2 GGUF
moved into an empty cache where it then loads offline and computes what the original does."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
from typer.testing import CliRunner

import kvdiag.cli
from kvdiag.errors import KvdiagError
from kvdiag.models import gguf_path
from kvdiag.models.registry import OFFLINE_MODELS, OfflineModel
from kvdiag.models.transfer import MIB, export_model, import_model

if not kvdiag.cli.app.registered_commands:
    kvdiag.cli._register()

PAYLOAD = bytes(range(256)) * 20 + b"tail"  # 5124 bytes


@pytest.fixture
def fake(monkeypatch, tmp_path):
    """An offline entry "fake-gguf" whose pinned file sits in a source cache; KVDIAG_CACHE points there."""
    entry = OfflineModel(
        "fake-gguf", "llama", "test entry", (), (), hashlib.sha256(PAYLOAD).hexdigest(), 2048
    )
    monkeypatch.setitem(OFFLINE_MODELS, "fake-gguf", entry)
    monkeypatch.setenv("KVDIAG_CACHE", str(tmp_path / "source-cache"))
    gguf_path("fake-gguf").parent.mkdir(parents=True)
    gguf_path("fake-gguf").write_bytes(PAYLOAD)
    return tmp_path


def exported(tmp_path, part_bytes=2000):
    manifest = export_model("fake-gguf", tmp_path / "usb", part_mib=part_bytes / MIB)
    return manifest, json.loads(manifest.read_text())


def test_export_writes_parts_and_a_manifest_checked_with_hashlib(fake):
    path, manifest = exported(fake)
    parts = sorted((fake / "usb").glob("fake-gguf.part*"))
    assert [p.name for p in parts] == ["fake-gguf.part000", "fake-gguf.part001", "fake-gguf.part002"]
    assert [p.stat().st_size for p in parts] == [2000, 2000, 1124]
    assert b"".join(p.read_bytes() for p in parts) == PAYLOAD
    assert manifest["model"] == "fake-gguf" and manifest["file"] == "fake-gguf.gguf"
    assert manifest["size"] == len(PAYLOAD) and manifest["sha256"] == hashlib.sha256(PAYLOAD).hexdigest()
    assert [p["sha256"] for p in manifest["parts"]] == [
        hashlib.sha256(p.read_bytes()).hexdigest() for p in parts
    ]
    assert manifest["kvdiag_version"] == kvdiag.__version__
    assert not [p for p in (fake / "usb").iterdir() if p.name.startswith(".")]  # no temporary files left
    # exporting again with bigger parts replaces the old parts
    exported(fake, part_bytes=6000)
    assert [p.name for p in (fake / "usb").glob("fake-gguf.part*")] == ["fake-gguf.part000"]


def test_import_assembles_into_an_empty_cache(fake, monkeypatch):
    exported(fake)
    monkeypatch.setenv("KVDIAG_CACHE", str(fake / "offline-cache"))
    target = import_model(fake / "usb", convert=False)
    assert target == fake / "offline-cache" / "gguf" / "fake-gguf.gguf" and target.read_bytes() == PAYLOAD
    assert os.listdir(target.parent) == ["fake-gguf.gguf"]


def corrupt_cases():
    def flip(usb, manifest):  # one byte of the middle part changed, same size
        part = usb / "fake-gguf.part001"
        data = bytearray(part.read_bytes())
        data[7] ^= 1
        part.write_bytes(bytes(data))

    def truncate(usb, manifest):
        part = usb / "fake-gguf.part002"
        part.write_bytes(part.read_bytes()[:-1])

    def remove(usb, manifest):
        (usb / "fake-gguf.part001").unlink()

    def foreign(usb, manifest):  # a manifest whose whole-file SHA-256 is not the registry's
        manifest["sha256"] = "0" * 64
        (usb / "fake-gguf.manifest.json").write_text(json.dumps(manifest))

    def reordered(usb, manifest):  # consistent parts listed in the wrong order: the whole check catches it
        manifest["parts"] = manifest["parts"][::-1]
        (usb / "fake-gguf.manifest.json").write_text(json.dumps(manifest))

    def not_a_manifest(usb, manifest):
        (usb / "fake-gguf.manifest.json").write_text(json.dumps({"model": "fake-gguf"}))

    return [
        (flip, r"part fake-gguf.part001 of fake-gguf is corrupt: SHA-256 [0-9a-f]{64}, the manifest says"),
        (truncate, "part fake-gguf.part002 of fake-gguf has 1123 bytes, the manifest says 1124"),
        (remove, r"part fake-gguf.part001 of fake-gguf is missing from .*usb"),
        (foreign, "the export's SHA-256 0000.* is not the registered fake-gguf's"),
        (reordered, "assemble to 5124 bytes with SHA-256 .*; expected 5124 bytes"),
        (not_a_manifest, "is not a kvdiag model export manifest"),
    ]


@pytest.mark.parametrize("damage, message", corrupt_cases(), ids=lambda x: getattr(x, "__name__", ""))
def test_a_corrupt_export_is_refused_and_the_cache_stays_empty(fake, monkeypatch, damage, message):
    _, manifest = exported(fake)
    damage(fake / "usb", manifest)
    monkeypatch.setenv("KVDIAG_CACHE", str(fake / "offline-cache"))
    with pytest.raises(KvdiagError, match=message):
        import_model(fake / "usb", convert=False)
    cache = fake / "offline-cache" / "gguf"
    assert not cache.exists() or os.listdir(cache) == []


def test_bad_arguments_are_clear(fake):
    with pytest.raises(KvdiagError, match="unknown offline model .*'tiny-llama'"):
        export_model("tiny-llama", fake / "usb")
    with pytest.raises(KvdiagError, match="--part-mib must be a positive number of MiB, got 0"):
        export_model("fake-gguf", fake / "usb", part_mib=0)
    with pytest.raises(KvdiagError, match="import directory .*nowhere does not exist"):
        import_model(fake / "nowhere")
    (fake / "empty").mkdir()
    with pytest.raises(KvdiagError, match=r"holds 0 model exports \(none\)"):
        import_model(fake / "empty")
    exported(fake)
    with pytest.raises(KvdiagError, match="unknown model export in .*'fake-ggu'; did you mean 'fake-gguf'"):
        import_model(fake / "usb", "fake-ggu")


def test_cli_export_and_import(fake, monkeypatch):
    runner = CliRunner()
    usb = fake / "usb"
    result = runner.invoke(kvdiag.cli.app, ["models", "export", "fake-gguf", str(usb), "--part-mib", "0.002"])
    assert result.exit_code == 0, result.output
    assert len(list(usb.glob("fake-gguf.part*"))) == 3  # 0.002 MiB = 2097 bytes per part
    monkeypatch.setenv("KVDIAG_CACHE", str(fake / "offline-cache"))
    result = runner.invoke(kvdiag.cli.app, ["models", "import", str(usb), "--no-convert"])
    assert result.exit_code == 0, result.output
    assert (fake / "offline-cache" / "gguf" / "fake-gguf.gguf").read_bytes() == PAYLOAD
    (usb / "fake-gguf.part000").write_bytes(b"x")
    bad = runner.invoke(kvdiag.cli.app, ["models", "import", str(usb)], env={"KVDIAG_DEBUG": None})
    assert (
        bad.exit_code == 2 and "kvdiag: error: part fake-gguf.part000 of fake-gguf has 1 bytes" in bad.output
    )


@pytest.mark.slow
def test_smollm2_moves_to_an_empty_cache_and_loads_offline(smollm2, tmp_path, monkeypatch):
    """The real GGUF (94 MiB, 2 parts of 60 MiB), imported and converted into an empty cache, with
    no wheels and no network: the converted model computes the same logits as the original cache's."""
    import torch

    from kvdiag.models import load_model

    original, tokenizer = smollm2
    manifest = json.loads(export_model("smollm2-135m", tmp_path / "usb", part_mib=60).read_text())
    assert [p["size"] for p in manifest["parts"]] == [60 * MIB, manifest["size"] - 60 * MIB]
    monkeypatch.setenv("KVDIAG_CACHE", str(tmp_path / "offline-cache"))
    monkeypatch.setenv(
        "KVDIAG_WHEELS", str(tmp_path / "no-wheels")
    )  # a fetch would fail: nothing to fetch from
    (tmp_path / "no-wheels").mkdir()
    import_model(tmp_path / "usb")
    assert (
        hashlib.sha256(gguf_path("smollm2-135m").read_bytes()).hexdigest()
        == OFFLINE_MODELS["smollm2-135m"].sha256
    )
    moved, _ = load_model("smollm2-135m")
    ids = tokenizer("The cache is a plain folder.", return_tensors="pt").input_ids
    with torch.inference_mode():
        torch.testing.assert_close(
            moved(input_ids=ids).logits, original(input_ids=ids).logits, rtol=0, atol=0
        )
