"""Wheel pinning, member extraction and the GGUF-marker stripping, without downloading anything."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from vllm_safeguard.prepare import model_source as ms


def test_cache_dir_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ms.CACHE_ENV, str(tmp_path / "c"))
    assert ms.cache_dir() == tmp_path / "c" and (tmp_path / "c").is_dir()


def test_pins_look_like_sha256() -> None:
    for w in (ms.SMOLLM2_WHEEL, ms.HARMBENCH_WHEEL):
        assert len(w.sha256) == 64 and int(w.sha256, 16) >= 0
        assert "==" in w.requirement and w.filename.endswith(".whl")


def test_fetch_wheel_verifies_digest(tmp_path: Path) -> None:
    data = b"not really a wheel"
    good = ms.PinnedWheel("x==1", "x-1-py3-none-any.whl", hashlib.sha256(data).hexdigest())
    (tmp_path / good.filename).write_bytes(data)
    assert ms.fetch_wheel(good, tmp_path) == tmp_path / good.filename  # present + right digest: no pip call
    bad = ms.PinnedWheel("x==1", good.filename, "0" * 64)
    with pytest.raises(ms.DownloadError, match="does not match"):
        ms.fetch_wheel(bad, tmp_path)
    assert not (tmp_path / good.filename).exists()  # a mismatching file is deleted


def test_extract_members_cannot_escape(tmp_path: Path) -> None:
    whl = tmp_path / "w.whl"
    with zipfile.ZipFile(whl, "w") as zf:
        zf.writestr("pkg/data/a.csv", "x,y\n1,2\n")
        zf.writestr("../../evil.csv", "boom")
    out = ms.extract_members(whl, ("pkg/data/a.csv", "../../evil.csv"), tmp_path / "dest")
    assert out["pkg/data/a.csv"].read_text().startswith("x,y")
    assert out["../../evil.csv"] == tmp_path / "dest" / "evil.csv"  # flattened into dest
    assert not (tmp_path.parent / "evil.csv").exists()


def test_strip_quantization_markers() -> None:
    model = SimpleNamespace(
        config=SimpleNamespace(quantization_config={"quant_method": "gguf"}),
        hf_quantizer=object(),
        is_quantized=True,
    )
    ms.strip_quantization_markers(model)
    assert not hasattr(model.config, "quantization_config")
    assert model.hf_quantizer is None and model.is_quantized is False
