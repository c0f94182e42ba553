"""The data-key family: generate (with plaintext or without), decrypt and rewrap data keys, one or many.

The replaced key provider's SJCL envelopes are told apart from kmsq's ``encryptedKey`` strings here, and only
here: :mod:`worker.legacy` decrypts them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

from schemas.envelope import TEXT_PREFIX, EncryptedDataKey, FormatError
from schemas.limits import MAX_ENCRYPTED_KEY_CHARS
from schemas.operations import Family
from schemas.replies import (
    DataKeyReply,
    DataKeysReply,
    PlaintextKeyReply,
    PlaintextKeysReply,
    WrappedDataKeyReply,
    WrappedDataKeysReply,
)
from schemas.requests import (
    DecryptDataKey,
    DecryptDataKeys,
    GenerateDataKey,
    GenerateDataKeys,
    GenerateDataKeyWithoutPlaintext,
    RewrapDataKey,
    RewrapDataKeys,
)
from worker import batch, rewrap, service
from worker.errors import ServiceError
from worker.handlers.registry import OpCall, Outcome, handles, item_error
from worker.legacy import root_key_names
from worker.legacy.root_key_names import looks_like_sjcl

FAMILY: Family = "data_keys"


def key_of(encrypted_key: object) -> tuple[str | None, int | None]:
    """The root key and version a kmsq ``encryptedKey`` names ((None, None) for anything else)."""
    if isinstance(encrypted_key, str) and encrypted_key.startswith(TEXT_PREFIX):
        with contextlib.suppress(FormatError):
            parsed = EncryptedDataKey.from_text(encrypted_key)
            return parsed.root_key_id, parsed.root_key_version
    return None, None


@handles(FAMILY, "generate_data_key", "generate_data_key_without_plaintext")
def generate_data_key(call: OpCall, params: GenerateDataKey | GenerateDataKeyWithoutPlaintext) -> Outcome:
    """A data key generated and wrapped inside the HSM; its plaintext only for ``generate_data_key``."""
    with_plaintext = isinstance(params, GenerateDataKey)
    key = service.generate_data_key(
        call.hsm, call.db, params.root_key_id, params.key_spec, with_plaintext, call.pool, call.keys
    )
    if key.plaintext_key is None:
        return Outcome(WrappedDataKeyReply(encryptedKey=key.encrypted_key), *key_of(key.encrypted_key))
    reply = DataKeyReply(encryptedKey=key.encrypted_key, plaintextKey=key.plaintext_key)
    return Outcome(reply, *key_of(key.encrypted_key))


@handles(FAMILY, "generate_data_keys")
def generate_data_keys(call: OpCall, params: GenerateDataKeys) -> Outcome:
    """``count`` data keys under one root key version, all or none."""
    keys = batch.generate_data_keys(
        call.hsm, call.db, params.count, params.with_plaintext, params.root_key_id, call.pool, call.keys
    )
    items: list[DataKeyReply | WrappedDataKeyReply] = [
        WrappedDataKeyReply(encryptedKey=k.encrypted_key)
        if k.plaintext_key is None
        else DataKeyReply(encryptedKey=k.encrypted_key, plaintextKey=k.plaintext_key)
        for k in keys
    ]
    return Outcome(DataKeysReply(items=items), *key_of(keys[0].encrypted_key))


@handles(FAMILY, "decrypt_data_key")
def decrypt_data_key(call: OpCall, params: DecryptDataKey) -> Outcome:
    """The plaintext of one ``encryptedKey`` (kmsq's, or the replaced API's SJCL envelope)."""
    (outcome,) = decrypt_all(call, [params.encrypted_key])
    if isinstance(outcome, ServiceError):
        raise outcome
    return Outcome(PlaintextKeyReply(plaintextKey=outcome), *key_of(params.encrypted_key))


@handles(FAMILY, "decrypt_data_keys")
def decrypt_data_keys(call: OpCall, params: DecryptDataKeys) -> Outcome:
    """Each ``encryptedKey``'s plaintext or error; the audit record names the first one's root key."""
    outcomes = decrypt_all(call, params.encrypted_keys)
    items = [item_error(o) if isinstance(o, ServiceError) else PlaintextKeyReply(plaintextKey=o) for o in outcomes]
    return Outcome(PlaintextKeysReply(items=items), *key_of(params.encrypted_keys[0]))


@handles(FAMILY, "rewrap_data_key")
def rewrap_data_key(call: OpCall, params: RewrapDataKey) -> Outcome:
    """One ``encryptedKey`` wrapped again under its root key's current version, inside the HSM."""
    (rewrapped,) = rewrap.rewrap_data_keys(call.hsm, call.db, [params.encrypted_key], call.pool, call.keys)
    if isinstance(rewrapped, ServiceError):
        raise rewrapped
    return Outcome(WrappedDataKeyReply(encryptedKey=rewrapped), *key_of(rewrapped))


@handles(FAMILY, "rewrap_data_keys")
def rewrap_data_keys(call: OpCall, params: RewrapDataKeys) -> Outcome:
    """Each ``encryptedKey`` rewrapped or its error; the audit record names the first rewrapped one's root key."""
    rewrapped = rewrap.rewrap_data_keys(call.hsm, call.db, params.encrypted_keys, call.pool, call.keys)
    items = [item_error(o) if isinstance(o, ServiceError) else WrappedDataKeyReply(encryptedKey=o) for o in rewrapped]
    first = next((o for o in rewrapped if isinstance(o, str)), None)
    return Outcome(WrappedDataKeysReply(items=items), *key_of(first))


def decrypt_all(call: OpCall, encrypted_keys: Sequence[str]) -> list[str | ServiceError]:
    """Every ``encryptedKey`` of a request: kmsq's by the service, the replaced system's SJCL envelopes by
    :mod:`worker.legacy`. Returns each one's ``plaintextKey`` or error.

    Raises InvalidRequest, before any work, when the SJCL envelopes could cost more PBKDF2 than one message
    may (worker.legacy.root_key_names.MAX_PBKDF2_ITERATIONS_PER_MESSAGE)."""
    old = [k for k in encrypted_keys if len(k) <= MAX_ENCRYPTED_KEY_CHARS and looks_like_sjcl(k)]
    versions: service.VersionCache = {}
    legacy = root_key_names.LegacyNames(call.hsm, call.db, call.keys) if old else contextlib.nullcontext()
    with legacy as names:
        if names is not None:
            names.check_budget(old)  # each costs PBKDF2 work; an oversized one is refused without any

        def decrypt(encrypted_key: str) -> str:
            if names is not None and looks_like_sjcl(encrypted_key):
                return names.decrypt(encrypted_key)
            return service.decrypt_data_key(call.hsm, call.db, encrypted_key, call.keys, versions)

        return batch.decrypt_data_keys(encrypted_keys, decrypt)
