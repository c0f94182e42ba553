"""The vendored test vectors are the shared ones, unedited."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

VECTORS = Path(__file__).resolve().parent / "vectors"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "vectors"
SHA256 = {
    "README.md": "0660b2f6ec79dbe42fbc3b6b95b73f0070b73ab8b9a84180f884674c1e093853",
    "legacy_rows.json": "cb586aeace09bee36b5f624ec64f074bca55922db89decdbaa7977e6a53bd7db",
    "sjcl_vectors.json": "cec94569f18fb6999c4a3064231a2ae96ac4bde3a3344a367620307c559c8240",
}


def vector_file(name: str) -> Path:
    """The path of a vendored vector file."""
    path = VECTORS / name
    assert path.is_file(), f"test vectors missing: {path}"
    return path


@pytest.mark.parametrize("name", sorted(SHA256))
def test_vendored_vectors_are_unedited(name: str) -> None:
    digest = hashlib.sha256(vector_file(name).read_bytes()).hexdigest()
    assert digest == SHA256[name]
    if (SHARED / name).is_file():  # next to a checkout that has the shared directory: the same bytes
        assert (SHARED / name).read_bytes() == (VECTORS / name).read_bytes()
