"""What a deployment needs of its token (worker.hsm_custody.missing): what every pool needs always, RSA's needs
only with an RSA root key, key custody's only when the token takes part, --in-hsm's never (only those requests
fail)."""

from __future__ import annotations

import pytest

from tests.unit_fixtures import Unit
from worker.hsm_custody import Capability, missing
from worker.replication import record_check
from worker.storage.db import transaction

pytestmark = pytest.mark.unit

GCM = Capability("CKM_AES_GCM", "every pool", False)
OAEP = Capability("CKM_RSA_PKCS_OAEP", "rsa-* root keys, key custody", False)
TRUSTED = Capability("CKA_WRAP_WITH_TRUSTED enforced", "key custody", False)
EC = Capability("secp256k1 key pairs", "--in-hsm signing keys", False)
FINE = Capability("C_GenerateRandom", "every pool", True)


@pytest.mark.parametrize(
    ("types", "custody", "lacking"),
    [
        ({"aes-256"}, False, [GCM]),
        ({"aes-256", "rsa-2048"}, False, [GCM, OAEP]),
        ({"aes-256"}, True, [GCM, OAEP, TRUSTED]),
        (set(), False, [GCM]),
    ],
)
def test_what_is_missing_depends_on_the_root_keys_and_custody(types: set[str], custody: bool,
                                                             lacking: list[Capability]) -> None:  # fmt: skip
    assert missing([GCM, OAEP, TRUSTED, EC, FINE], types, custody) == lacking


def test_nothing_is_missing_when_everything_is_there() -> None:
    assert missing([FINE, Capability("CKM_ECDSA", "--in-hsm signing keys", True)], {"rsa-4096"}, True) == []


def test_the_last_check_of_each_token_is_recorded_for_kmsq_status(unit: Unit) -> None:
    from kmsq.commands.status import _tokens

    with transaction(unit.service.sessions) as db:
        record_check(db, "token-a", [GCM, OAEP], "worker alpha")
        record_check(db, "token-b", [], "kmsq hsm check")
    with transaction(unit.service.sessions) as db:
        record_check(db, "token-a", [OAEP], "kmsq hsm check")  # a second check replaces the first
    with transaction(unit.service.sessions) as db:
        checks = _tokens(db)["checks"]
    assert {name: (c["checked_by"], c["missing"]) for name, c in checks.items()} == {
        "token-a": ("kmsq hsm check", ["CKM_RSA_PKCS_OAEP (rsa-* root keys, key custody)"]),
        "token-b": ("kmsq hsm check", []),
    }
