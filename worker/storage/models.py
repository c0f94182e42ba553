"""SQLAlchemy 2 typed models. The same models serve Postgres (production, tests) and SQLite (embedded).

``private_keys`` keeps the column names of the table kmsq replaces (``encryptedPrv``, ``encryptedDataKey``,
``rootKey``) so that its readers can be pointed at kmsq's table; every secret column holds ciphertext only.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Integer,
    MetaData,
    Numeric,
    String,
    Text,
    UniqueConstraint,
    true,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator, TypeEngine

from schemas.limits import MAX_COIN_CHARS, MAX_PUB_CHARS

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """Returns the current time, timezone-aware UTC."""
    return datetime.now(UTC)


class BaseUnits(TypeDecorator[int]):
    """An amount in a coin's base unit, up to 2**256 (wei): NUMERIC(78, 0) on Postgres, its decimal text on SQLite
    (whose integers stop at 2**63)."""

    impl = Numeric(78, 0)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        return dialect.type_descriptor(String(80) if dialect.name == "sqlite" else Numeric(78, 0))

    def process_bind_param(self, value: int | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        return str(value) if dialect.name == "sqlite" else Decimal(value)

    def process_result_value(self, value: Any, dialect: Dialect) -> int | None:
        return None if value is None else int(value)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


def aad_version(row: PrivateKey | FleetKey | LegacyRootKey) -> int:
    """The root key version a sealed row's associated data names: the version it was sealed under.

    A rewrap wraps the row's data key again under a newer version (``root_key_version``) and leaves the
    ciphertext, and so its associated data, as it was; ``sealed_version`` then keeps the original version.
    """
    return row.sealed_version if row.sealed_version is not None else row.root_key_version


class RootKey(Base):
    """A root key: a named, versioned key in one HSM pool. Its versions hold the HSM objects."""

    __tablename__ = "root_keys"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    type: Mapped[str] = mapped_column(String(16))  # aes-256 | rsa-2048 | rsa-3072 | rsa-4096
    pool: Mapped[str] = mapped_column(String(64), index=True)
    state: Mapped[str] = mapped_column(String(16), default="enabled")  # enabled | disabled
    current_version: Mapped[int] = mapped_column(Integer)
    # Ciphertexts under an older version are refused (kmsq root-key set --min-decryption-version).
    min_decryption_version: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    rotation_period_days: Mapped[int | None] = mapped_column(Integer, nullable=True)  # rotated by its pool when due
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    policy_mac: Mapped[str | None] = mapped_column(String(64), nullable=True)  # worker.policy
    approval: Mapped[str | None] = mapped_column(Text, nullable=True)  # worker.approvals: the evidence


class Deployment(Base):
    """The database's own identity (one row, made by migration 0013): which of a token's policy anchors is this
    database's (worker.policy_anchor). One token may serve several databases (tests do); a row changed or
    removed points at an anchor that does not vouch for these rows, and they are refused."""

    __tablename__ = "deployment"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Pool(Base):
    """An HSM pool's state. A pool is served only while its row is there, enabled and sealed (worker.policy)."""

    __tablename__ = "pools"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    state: Mapped[str] = mapped_column(String(16))  # enabled | disabled
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    policy_mac: Mapped[str | None] = mapped_column(String(64), nullable=True)  # worker.policy
    approval: Mapped[str | None] = mapped_column(Text, nullable=True)  # worker.approvals: the evidence


class RootKeyVersion(Base):
    """One HSM object (or key pair) of a root key. The newest enabled version wraps; every enabled one unwraps."""

    __tablename__ = "root_key_versions"

    root_key_id: Mapped[str] = mapped_column(ForeignKey("root_keys.id"), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    hsm_id: Mapped[str] = mapped_column(String(128))  # CKA_ID, hex
    hsm_label: Mapped[str] = mapped_column(String(128))  # CKA_LABEL
    wrap_algorithm: Mapped[int] = mapped_column(Integer)  # schemas.envelope.WrapAlgorithm
    state: Mapped[str] = mapped_column(String(16), default="enabled")  # enabled | pending_destroy | destroyed
    destroy_wait_days: Mapped[int | None] = mapped_column(Integer, nullable=True)  # with pending_destroy
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    policy_mac: Mapped[str | None] = mapped_column(String(64), nullable=True)  # worker.policy
    approval: Mapped[str | None] = mapped_column(Text, nullable=True)  # worker.approvals: the evidence


class PrivateKey(Base):
    """A stored private key: AES-256-GCM ciphertext and the HSM-wrapped data key that opens it."""

    __tablename__ = "private_keys"
    __table_args__ = (
        UniqueConstraint("pub", "source", name="uq_private_keys_pub_source"),
        ForeignKeyConstraint(
            ["rootKey", "root_key_version"],
            ["root_key_versions.root_key_id", "root_key_versions.version"],
            name="fk_private_keys_root_key_version",
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    pub: Mapped[str] = mapped_column(String(MAX_PUB_CHARS))
    source: Mapped[str] = mapped_column(String(16))  # user | backup
    coin: Mapped[str] = mapped_column(String(MAX_COIN_CHARS))
    type: Mapped[str] = mapped_column(String(16))  # independent | tss
    provider: Mapped[str] = mapped_column(String(64))
    root_key: Mapped[str] = mapped_column("rootKey", String(64))
    root_key_version: Mapped[int] = mapped_column(Integer)
    sealed_version: Mapped[int | None] = mapped_column(Integer, nullable=True)  # see aad_version
    format_version: Mapped[int] = mapped_column(Integer)
    encrypted_prv: Mapped[str] = mapped_column("encryptedPrv", Text)
    encrypted_data_key: Mapped[str] = mapped_column("encryptedDataKey", Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # False for a key generated inside kmsq for signing (generate_signing_key): get_key refuses it. Bound into
    # the ciphertext's associated data (schemas.envelope.PrivateKeyContext), so changing it breaks the row.
    exportable: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())
    # The caller that generated a signing key (bound into the associated data too); None for stored keys and for
    # keys generated before owners were kept.
    owner: Mapped[str | None] = mapped_column(String(64), nullable=True)


class Caller(Base):
    """A registered caller: its public keys and what it may do."""

    __tablename__ = "callers"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    signing_key: Mapped[str] = mapped_column(String(64))  # Ed25519 public key, base64url
    signing_key_id: Mapped[str] = mapped_column(String(32))
    reply_key: Mapped[str] = mapped_column(String(64))  # X25519 (HPKE) public key, base64url
    allowed_ops: Mapped[str] = mapped_column(Text)  # comma-separated operation names
    root_keys: Mapped[str] = mapped_column(Text)  # comma-separated root key ids, or "*" for all
    plaintext: Mapped[bool] = mapped_column(Boolean)
    state: Mapped[str] = mapped_column(String(16), default="enabled")  # enabled | disabled
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    policy_mac: Mapped[str | None] = mapped_column(String(64), nullable=True)  # worker.policy
    approval: Mapped[str | None] = mapped_column(Text, nullable=True)  # worker.approvals: the evidence
    # Sharing a pool (worker.quotas): auto (the client picks: batches bulk) | bulk (every request in the bulk lane)
    lane: Mapped[str] = mapped_column(String(16), default="auto", server_default="auto")
    rate_requests: Mapped[float | None] = mapped_column(Float, nullable=True)  # messages per second, None: no quota
    rate_items: Mapped[float | None] = mapped_column(Float, nullable=True)  # items per second (a single is one)


class RateBucket(Base):
    """A caller's token buckets in a pool (worker.quotas), shared by every worker of the pool: the tokens left of
    each quota at ``at`` (epoch seconds), and the nonce of the last take that passed."""

    __tablename__ = "rate_buckets"

    pool: Mapped[str] = mapped_column(String(64), primary_key=True)
    caller: Mapped[str] = mapped_column(String(64), primary_key=True)
    requests: Mapped[float] = mapped_column(Float)
    items: Mapped[float] = mapped_column(Float)
    at: Mapped[float] = mapped_column(Float)
    taken: Mapped[str] = mapped_column(String(32), default="", server_default="")


class RequestRecord(Base):
    """One authenticated request and its reply, committed in the same transaction as its effect."""

    __tablename__ = "requests"

    caller: Mapped[str] = mapped_column(String(64), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))  # SHA-256 of the signed body bytes, hex
    op: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))  # ok | error (pending only inside the open transaction)
    error_code: Mapped[str | None] = mapped_column(String(32), nullable=True)
    reply: Mapped[str] = mapped_column(Text)  # the signed reply envelope (secrets only HPKE-sealed)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # The request's own expires_at (bounded, see worker.retention.record_expiry): the record is pruned once
    # no delivery or get_result can need it any more.
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    # When the record may be pruned, MACed by the writing worker under its fleet key (worker.record_stamps); the
    # pruner trusts only this, never expires_at. None in records written before migration 0014.
    keep_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    keep_key_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    keep_mac: Mapped[str | None] = mapped_column(String(43), nullable=True)


class RejectionCount(Base):
    """Messages refused before they were authenticated (or bound to their headers), counted per minute, pool,
    caller, operation, code and reason, so that a flood of them adds counts, not rows. ``caller`` is a
    registered caller's name, or ``?`` for every unknown one; ``last_request_id`` is a sample (the latest)."""

    __tablename__ = "rejection_counts"

    minute: Mapped[datetime] = mapped_column(DateTime(timezone=True), primary_key=True)
    pool: Mapped[str] = mapped_column(String(64), primary_key=True)
    caller: Mapped[str] = mapped_column(String(64), primary_key=True)
    op: Mapped[str] = mapped_column(String(64), primary_key=True)
    code: Mapped[str] = mapped_column(String(32), primary_key=True)
    reason: Mapped[str] = mapped_column(String(64), primary_key=True)
    count: Mapped[int] = mapped_column(BigInteger)
    last_request_id: Mapped[str] = mapped_column(String(36))


class FleetKey(Base):
    """A pool's fleet keys: Ed25519 (signs replies) and X25519 (opens inbound secrets).

    The private halves are sealed together with AES-256-GCM under an HSM-wrapped data key of the pool's
    root key, like a stored private key; only a worker process of the pool ever holds them in plaintext.
    """

    __tablename__ = "fleet_keys"
    __table_args__ = (
        ForeignKeyConstraint(
            ["root_key", "root_key_version"],
            ["root_key_versions.root_key_id", "root_key_versions.version"],
            name="fk_fleet_keys_root_key_version",
        ),
    )

    pool: Mapped[str] = mapped_column(String(64), primary_key=True)
    signing_key: Mapped[str] = mapped_column(String(64))
    transport_key: Mapped[str] = mapped_column(String(64))
    root_key: Mapped[str] = mapped_column(String(64))
    root_key_version: Mapped[int] = mapped_column(Integer)
    sealed_version: Mapped[int | None] = mapped_column(Integer, nullable=True)  # see aad_version
    encrypted_private: Mapped[str] = mapped_column(Text)
    encrypted_data_key: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class LegacyImport(Base):
    """A row of the replaced system's ``private_keys`` table that ``kmsq import-legacy`` brought in.

    ``origin`` names the old table (``<database>/<table>``, no host or credentials). The row's secrets are
    not kept: only which kmsq row now holds its key.
    """

    __tablename__ = "legacy_imports"

    origin: Mapped[str] = mapped_column(String(255), primary_key=True)
    legacy_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    private_key_id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), ForeignKey("private_keys.id")
    )
    outcome: Mapped[str] = mapped_column(String(16))  # imported | matched (already stored, same key)
    legacy_provider: Mapped[str | None] = mapped_column(String(64), nullable=True)
    legacy_created_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    imported_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class LegacyRootKey(Base):
    """A root key *name* of the replaced system (its SJCL password for data keys), sealed with AES-256-GCM
    under an HSM-wrapped data key of one of kmsq's root keys. See :mod:`worker.legacy.root_key_names`."""

    __tablename__ = "legacy_root_keys"
    __table_args__ = (
        ForeignKeyConstraint(
            ["root_key", "root_key_version"],
            ["root_key_versions.root_key_id", "root_key_versions.version"],
            name="fk_legacy_root_keys_root_key_version",
        ),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    root_key: Mapped[str] = mapped_column(String(64))
    root_key_version: Mapped[int] = mapped_column(Integer)
    sealed_version: Mapped[int | None] = mapped_column(Integer, nullable=True)  # see aad_version
    encrypted_name: Mapped[str] = mapped_column(Text)
    encrypted_data_key: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Job(Base):
    """A named, resumable operator job (e.g. a rewrap): what it has done, counted in the transactions that
    do it, so that the counts stay exact however often it is interrupted."""

    __tablename__ = "jobs"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))  # rewrap
    subject: Mapped[str] = mapped_column(String(64))  # the root key id
    state: Mapped[str] = mapped_column(String(16))  # running | finished
    done: Mapped[int] = mapped_column(BigInteger, default=0)
    failed: Mapped[int] = mapped_column(BigInteger, default=0)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class AuditRecord(Base):
    """One record of a pool's audit chain (worker.audit_log): who did what, with which root key version,
    and the outcome; identifiers and codes only, never a secret or a ciphertext."""

    __tablename__ = "audit_log"

    pool: Mapped[str] = mapped_column(String(64), primary_key=True)  # or "*" for pool-less actions
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    actor: Mapped[str] = mapped_column(String(64))  # the caller, "?" (unknown callers), or "operator:<user>"
    action: Mapped[str] = mapped_column(String(64))  # the operation, or the operator command
    outcome: Mapped[str] = mapped_column(String(32))  # ok, an error code, or rejected:<code>
    root_key_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    root_key_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    request_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    detail: Mapped[str] = mapped_column(String(255))
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))
    mac: Mapped[str] = mapped_column(String(64))


class AuditCheckpoint(Base):
    """Where a pool's audit chain starts once its oldest records were pruned (worker.retention): the last
    pruned record's sequence number, hash and time, MACed in the HSM so that nobody can move it forward to
    hide records deleted within the retention period."""

    __tablename__ = "audit_checkpoints"

    pool: Mapped[str] = mapped_column(String(64), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    hash: Mapped[str] = mapped_column(String(64))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    pruned_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    mac: Mapped[str] = mapped_column(String(64))


class AuditHead(Base):
    """The last record of a pool's audit chain; its row lock serializes appends to the chain."""

    __tablename__ = "audit_heads"

    pool: Mapped[str] = mapped_column(String(64), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    hash: Mapped[str] = mapped_column(String(64))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class HsmToken(Base):
    """A token enrolled into the deployment (worker.replication): its name (the token's serial number) and its
    transport public key, which another token's security officer imports as trusted after comparing the
    fingerprint on both hosts. A row alone makes no token trusted: only that SO step does."""

    __tablename__ = "hsm_tokens"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    transport_key: Mapped[str] = mapped_column(Text)  # DER SubjectPublicKeyInfo, base64url
    fingerprint: Mapped[str] = mapped_column(String(79))
    enrolled_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class KeyCopy(Base):
    """A key wrapped by one token for another (worker.hsm_custody.WrappedKey), waiting for the target to unwrap
    it: only that token's transport key (or the replication key wrapped under it) opens it."""

    __tablename__ = "key_copies"

    target: Mapped[str] = mapped_column(String(64), primary_key=True)
    label: Mapped[str] = mapped_column(String(128), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    mechanism: Mapped[str] = mapped_column(String(24))
    wrapped: Mapped[str] = mapped_column(Text)  # base64url
    kcv: Mapped[str] = mapped_column(String(64))
    public: Mapped[str] = mapped_column(Text)  # JSON: a key pair's public half, hex
    source: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class TokenKey(Base):
    """What a token holds, as that token last reported it (``kmsq hsm replicate``, ``kmsq hsm list`` on its host):
    a key's label, kind and key check value, computed inside the token."""

    __tablename__ = "token_keys"

    token: Mapped[str] = mapped_column(String(64), primary_key=True)
    label: Mapped[str] = mapped_column(String(128), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    kcv: Mapped[str] = mapped_column(String(16))
    replicable: Mapped[bool] = mapped_column(Boolean)
    seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # HMAC-SHA256 under the policy key the tokens share, over (token, label, kcv): a source believes a target
    # holds a key only by a row that verifies (None: reported before the token had the policy key).
    mac: Mapped[str | None] = mapped_column(String(64), nullable=True)


class TokenCheck(Base):
    """What a token last answered to the check of what kmsq needs of it (worker.hsm_custody.probe), run by
    ``kmsq hsm check`` or by a worker before it serves: shown by ``kmsq status``."""

    __tablename__ = "token_checks"

    token: Mapped[str] = mapped_column(String(64), primary_key=True)
    checked_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    checked_by: Mapped[str] = mapped_column(String(32))  # "kmsq hsm check" or "worker <pool>"
    missing: Mapped[str] = mapped_column(Text)  # JSON list of "capability (needed for)"; [] when nothing is


class OperatorSetRecord(Base):
    """One operator set of the deployment's chain (docs/DUAL_CONTROL.md): the genesis (``seq`` 0), whose digest
    the workers pin, then each set that M operators of the one before approved."""

    __tablename__ = "operator_sets"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    digest: Mapped[str] = mapped_column(String(64), unique=True)  # schemas.quorum.OperatorSet.digest
    document: Mapped[str] = mapped_column(Text)  # the set as canonical JSON
    change: Mapped[str] = mapped_column(Text)  # the change document that made it (canonical JSON)
    approvals: Mapped[str] = mapped_column(Text)  # JSON list of schemas.quorum.Approval documents
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Proposal(Base):
    """A proposed change awaiting the operators' approvals (``kmsq propose``, ``approve``, ``apply``)."""

    __tablename__ = "proposals"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    digest: Mapped[str] = mapped_column(String(64))  # of ``document``: what approvals sign
    document: Mapped[str] = mapped_column(Text)  # the change document, canonical JSON
    state: Mapped[str] = mapped_column(String(16))  # pending | applied | cancelled
    proposed_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    closed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    closed_by: Mapped[str | None] = mapped_column(String(64), nullable=True)


class ProposalApproval(Base):
    """One operator's approval of a proposal (each operator at most once)."""

    __tablename__ = "proposal_approvals"

    proposal_id: Mapped[str] = mapped_column(ForeignKey("proposals.id"), primary_key=True)
    operator: Mapped[str] = mapped_column(String(64), primary_key=True)
    approval: Mapped[str] = mapped_column(Text)  # schemas.quorum.Approval as JSON
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class SigningRulesRow(Base):
    """One scope's signing rules (schemas.signing_rules): a policy row, MACed and approved like the others. A
    wallet scope lists its keys (``members``, xpubs), so that its rules bind each of them whatever a PSBT says."""

    __tablename__ = "signing_rules"

    scope: Mapped[str] = mapped_column(String(160), primary_key=True)  # default | key:X | wallet:ID | coin:C | caller:N
    rules: Mapped[str] = mapped_column(Text)  # the document, canonical JSON
    members: Mapped[str] = mapped_column(Text, default="")  # comma-separated xpubs of a wallet scope
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    policy_mac: Mapped[str | None] = mapped_column(String(64), nullable=True)  # worker.policy
    approval: Mapped[str | None] = mapped_column(Text, nullable=True)  # worker.approvals: the evidence


class SigningLogEntry(Base):
    """One signed payload (docs/PROTOCOL.md, "Signing rules"): written in the transaction of its request record, so
    a redelivery does not count twice; the windows of the rules sum these."""

    __tablename__ = "signing_log"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    signed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    caller: Mapped[str] = mapped_column(String(64))
    pub: Mapped[str] = mapped_column(String(MAX_PUB_CHARS), index=True)
    coin: Mapped[str] = mapped_column(String(MAX_COIN_CHARS))
    wallet: Mapped[str | None] = mapped_column(String(32), nullable=True)  # worker.signing_rules.wallet_id
    payload_digest: Mapped[str] = mapped_column(String(64))  # hex SHA-256 of the payload as sent
    payment: Mapped[int] = mapped_column(BaseUnits)  # what left the wallet, in the coin's base unit
    fee: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    kind: Mapped[str] = mapped_column(String(16))  # psbt | hash
