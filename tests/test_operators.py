"""worker.operators: the pinned genesis operator set and the operator keys an operator command signs with."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from schemas.quorum import OperatorIdentity, OperatorSet
from tests.conftest import embedded_settings
from worker.errors import ConfigError
from worker.operators import ensure_developer_set, local_operators, read_pinned, write_pinned


def test_the_embedded_default_is_one_developer_and_stays_the_same(tmp_path: Path) -> None:
    settings = embedded_settings(tmp_path)
    assert local_operators(settings) is None  # nothing pinned yet
    operators, created = ensure_developer_set(settings)
    assert created and operators.quorum == 1 and [o.name for o in operators.operators] == ["admin"]
    key = tmp_path / "operators" / "admin.operator.json"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert ensure_developer_set(settings) == (operators, False)
    assert read_pinned(settings.operator_set_file) == operators
    local = local_operators(settings)
    assert local is not None and local.holds_genesis() and local.genesis == operators


def test_the_keys_and_the_set_can_be_named(tmp_path: Path) -> None:
    alice, bob = OperatorIdentity.generate("alice"), OperatorIdentity.generate("bob")
    alice.write(tmp_path / "alice")
    pinned = tmp_path / "etc" / "operator-set.json"
    write_pinned(pinned, OperatorSet((alice.public, bob.public), 2))
    settings = embedded_settings(tmp_path / "home", KMSQ_OPERATOR_SET=str(pinned),
                                 KMSQ_OPERATOR_KEY=str(tmp_path / "alice" / "alice.operator.json"))  # fmt: skip
    local = local_operators(settings)
    assert local is not None and [i.name for i in local.identities] == ["alice"] and not local.holds_genesis()


def test_a_missing_or_broken_pin_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no pinned operator set at .*kmsq init"):
        read_pinned(tmp_path / "operator-set.json")
    (tmp_path / "operator-set.json").write_text('{"kind": "kmsq-fleet", "v": 1}')
    with pytest.raises(ConfigError, match="is not a kmsq-operator-set file"):
        read_pinned(tmp_path / "operator-set.json")
    (tmp_path / "operator-set.json").write_text('{"kind": "kmsq-operator-set", "v": 1, "operator_set": {}}')
    with pytest.raises(ConfigError, match="malformed operator set"):
        read_pinned(tmp_path / "operator-set.json")
    settings = embedded_settings(tmp_path, KMSQ_OPERATOR_KEY=str(tmp_path / "nobody.operator.json"))
    write_pinned(settings.operator_set_file, OperatorSet((OperatorIdentity.generate("x").public,), 1))
    with pytest.raises(ConfigError, match="cannot read"):
        local_operators(settings)


def test_an_encrypted_operator_key_opens_with_its_passphrase_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice = OperatorIdentity.generate("alice")
    alice.write(tmp_path / "alice", b"s3cret passphrase")
    pinned = tmp_path / "operator-set.json"
    write_pinned(pinned, OperatorSet((alice.public,), 1))
    settings = embedded_settings(tmp_path / "home", KMSQ_OPERATOR_SET=str(pinned),
                                 KMSQ_OPERATOR_KEY=str(tmp_path / "alice" / "alice.operator.json"))  # fmt: skip
    monkeypatch.delenv("KMSQ_OPERATOR_PASSPHRASE_FILE", raising=False)
    with pytest.raises(ConfigError, match="is encrypted: give its passphrase"):
        local_operators(settings)  # (no terminal here)
    (tmp_path / "pass").write_text("s3cret passphrase\n")
    monkeypatch.setenv("KMSQ_OPERATOR_PASSPHRASE_FILE", str(tmp_path / "pass"))
    local = local_operators(settings)
    assert local is not None and local.identities[0].public == alice.public and local.holds_genesis()
