"""Configuration from ``KMSQ_*`` environment variables and an optional ``$KMSQ_HOME/kmsq.toml``.

Environment variables win over the file. With no ``KMSQ_PKCS11_MODULE`` kmsq uses its *embedded* token: a
SoftHSM2 token that ``kmsq init`` creates under ``KMSQ_HOME`` (its own ``softhsm2.conf``, token directory and
a 0600 PIN file). With ``KMSQ_PKCS11_MODULE`` set kmsq uses that token as it is and never initializes it.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs

from schemas.wire import DEFAULT_CLOCK_SKEW_SECONDS, embedded_broker_url, namespace_key_prefix
from worker.errors import ConfigError

SOFTHSM2_LIBRARY_PATHS = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
)
EMBEDDED_TOKEN_LABEL = "kmsq"  # noqa: S105 - a token label, not a secret
CONFIG_FILE_NAME = "kmsq.toml"
# File keys accepted in kmsq.toml, each the lower-case env name without the KMSQ_ prefix.
_KEYS = (
    "database_url",
    "broker_url",
    "pkcs11_module",
    "pkcs11_token_label",
    "pkcs11_pin",
    "pkcs11_pin_file",
    "default_pool",
    "clock_skew_seconds",
    "cache_seconds",
    "namespace",
    "reply_grace_seconds",
    "audit_retention_seconds",
    "prune_interval_seconds",
    "prune_batch",
    "reply_queue_ttl_seconds",
    "replicate_interval_seconds",
    "schedule_interval_seconds",
    "min_tokens",
    "require_sync_standby",
    "operator_set",
    "operator_key",
)
# Retention (worker.retention): a request record is kept until its expiry + the clock skew + this grace, so that
# get_result can still ask for its reply.
DEFAULT_REPLY_GRACE_SECONDS = 600
DEFAULT_AUDIT_RETENTION_SECONDS = 400 * 86400  # 0: audit records are kept forever
DEFAULT_PRUNE_INTERVAL_SECONDS = 10  # 0: workers do not prune (kmsq prune still does)
DEFAULT_PRUNE_BATCH = 500
# A reply queue nobody reads is deleted this long after the last reply was put on it (its TTL is refreshed by
# every reply; a queue being read is empty and takes no memory).
DEFAULT_REPLY_QUEUE_TTL_SECONDS = 1800
# Workers replicate keys between the deployment's tokens (worker.replication) this often; 0: only kmsq hsm replicate.
DEFAULT_REPLICATE_INTERVAL_SECONDS = 30
DEFAULT_SCHEDULE_INTERVAL_SECONDS = 300  # how often a worker looks for destructions that fell due


@dataclass(frozen=True)
class Settings:
    """Resolved configuration. ``pkcs11_pin`` is never printed: see :meth:`__repr__`."""

    home: Path
    database_url: str
    broker_url: str | None
    pkcs11_module: str | None
    pkcs11_token_label: str
    pkcs11_pin: str | None
    pkcs11_pin_file: Path | None
    default_pool: str = "default"
    clock_skew_seconds: int = DEFAULT_CLOCK_SKEW_SECONDS
    cache_seconds: int = 2  # workers: how long callers and root keys are cached per process
    namespace: str | None = None  # prefix of every Redis key (schemas.wire.namespace_key_prefix)
    reply_grace_seconds: int = DEFAULT_REPLY_GRACE_SECONDS
    audit_retention_seconds: int = DEFAULT_AUDIT_RETENTION_SECONDS
    prune_interval_seconds: int = DEFAULT_PRUNE_INTERVAL_SECONDS
    prune_batch: int = DEFAULT_PRUNE_BATCH
    reply_queue_ttl_seconds: int = DEFAULT_REPLY_QUEUE_TTL_SECONDS
    replicate_interval_seconds: int = DEFAULT_REPLICATE_INTERVAL_SECONDS
    schedule_interval_seconds: int = DEFAULT_SCHEDULE_INTERVAL_SECONDS
    min_tokens: int = 1  # workers wrap under a root key version only once it is on this many tokens
    require_sync_standby: bool = False  # workers refuse a Postgres primary without a synchronous standby
    operator_set: Path | None = None  # the pinned genesis operator set (default $KMSQ_HOME/operator-set.json)
    operator_key: tuple[Path, ...] = ()  # operator commands: the operators' keys they may sign with

    @property
    def operator_set_file(self) -> Path:
        """The file holding the genesis operator set this host pins (docs/DUAL_CONTROL.md)."""
        return self.operator_set or self.home / "operator-set.json"

    @property
    def operator_key_files(self) -> tuple[Path, ...]:
        """The operator keys an operator command signs with: ``KMSQ_OPERATOR_KEY`` (comma-separated), else every
        ``$KMSQ_HOME/operators/*.operator.json`` (``kmsq init``'s 1-of-1 key)."""
        if self.operator_key:
            return self.operator_key
        return tuple(sorted((self.home / "operators").glob("*.operator.json")))

    @property
    def embedded_broker(self) -> bool:
        """True when kmsq runs its own redis-server on a Unix socket under ``home``."""
        return self.broker_url is None

    @property
    def effective_broker_url(self) -> str:
        """The configured broker, or the embedded one."""
        return self.broker_url or embedded_broker_url(str(self.home))

    @property
    def embedded_hsm(self) -> bool:
        """True when kmsq manages its own SoftHSM2 token under ``home``."""
        return self.pkcs11_module is None

    @property
    def softhsm2_conf(self) -> Path:
        """The SoftHSM2 configuration file of the embedded token."""
        return self.home / "softhsm2.conf"

    @property
    def token_dir(self) -> Path:
        """The directory holding the embedded token."""
        return self.home / "tokens"

    @property
    def embedded_pin_file(self) -> Path:
        """Where ``kmsq init`` keeps the embedded token's user PIN (mode 0600)."""
        return self.home / "hsm-user.pin"

    def module_path(self) -> str:
        """Returns the PKCS#11 library path. Raises ConfigError if the embedded library is missing."""
        if self.pkcs11_module:
            return self.pkcs11_module
        for candidate in SOFTHSM2_LIBRARY_PATHS:
            if Path(candidate).exists():
                return candidate
        raise ConfigError("SoftHSM2 library not found (install the softhsm2 package or set KMSQ_PKCS11_MODULE)")

    def read_pin(self) -> str:
        """Returns the user PIN. Raises ConfigError when none is configured or the file is unreadable."""
        if self.pkcs11_pin:
            return self.pkcs11_pin
        pin_file = self.pkcs11_pin_file or (self.embedded_pin_file if self.embedded_hsm else None)
        if pin_file is None:
            raise ConfigError("no PKCS#11 PIN configured (set KMSQ_PKCS11_PIN or KMSQ_PKCS11_PIN_FILE)")
        try:
            return pin_file.read_text(encoding="utf-8").strip()
        except OSError as e:
            raise ConfigError(f"cannot read PIN file {pin_file}: {e.strerror}") from None

    def __repr__(self) -> str:
        return (
            f"Settings(home={str(self.home)!r}, database_url={redact_url(self.database_url)!r}, "
            f"broker_url={redact_url(self.broker_url or '')!r}, pkcs11_module={self.pkcs11_module!r}, "
            f"pkcs11_token_label={self.pkcs11_token_label!r}, pkcs11_pin=<redacted>)"
        )


def redact_url(url: str) -> str:
    """Returns ``url`` with any password replaced by ``***``: the one after ``USER:`` (in each URL of a
    ``;``-separated list) and a ``password=`` query parameter. A value that is not a URL (no ``://``) may
    still hold one: everything before its last ``@`` is hidden, or, without an ``@``, everything after its
    first ``:``."""
    return ";".join(_redact_one(part) for part in _URL_LIST.split(url))


_URL_LIST = re.compile(r";(?=[A-Za-z][A-Za-z0-9+.-]*://)")  # kombu's failover list: URL;URL...
_QUERY_PASSWORD = re.compile(r"(?i)([?&](?:password|sslpassword)=)[^&#]*")


def _redact_one(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep:
        if "@" in url:
            return "***@" + _QUERY_PASSWORD.sub(r"\1***", url.rpartition("@")[2])
        head, colon, _ = url.partition(":")
        return f"{head}:***" if colon else url
    if "@" in rest:  # the last @: a password may hold another one
        creds, _, host = rest.rpartition("@")
        user, colon, _ = creds.partition(":")
        rest = f"{user}:***@{host}" if colon else rest
    return scheme + "://" + _QUERY_PASSWORD.sub(r"\1***", rest)


# The brokers kmsq runs on (tasks.transport hardens kombu's Redis transport; nothing else is hardened, and
# kmsq's reply queues and queue sampling are Redis lists): kombu's Redis URLs, and Sentinel.
REDIS_SCHEMES = ("redis", "rediss", "redis+socket", "sentinel")
AMQP_SCHEMES = ("amqp", "amqps")  # RabbitMQ (kombu's py-amqp transport)
BROKER_SCHEMES = (*REDIS_SCHEMES, *AMQP_SCHEMES)
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")


def is_rabbitmq(url: str) -> bool:
    """True when the broker URL ``url`` (checked by :func:`broker_url_problem`) is RabbitMQ's."""
    return url.lower().startswith(AMQP_SCHEMES)


def broker_url_problem(url: str) -> str | None:
    """Why kmsq cannot use ``url`` as its broker (a text that quotes no more of it than its scheme), or None.

    Each URL of a ``;``-separated list (kombu's failover) must be one of BROKER_SCHEMES; a Sentinel list
    needs ``?master_name=NAME``. Whether the broker answers is not checked here."""
    supported = ("kmsq's broker is Redis (redis://, rediss://, redis+socket://, or sentinel://...?master_name=NAME) "
                 "or RabbitMQ (amqp://, amqps://)")  # fmt: skip
    schemes = set()
    for part in _URL_LIST.split(url):
        scheme, sep, _ = part.partition("://")
        if not sep or not _SCHEME.fullmatch(scheme):
            return f"the broker URL is not a URL ({supported})"
        if scheme.lower() not in BROKER_SCHEMES:
            return f"unsupported broker URL scheme {scheme.lower()}:// ({supported})"
        schemes.add(scheme.lower())
    if schemes & set(AMQP_SCHEMES) and schemes - set(AMQP_SCHEMES):
        return "a broker URL list mixes Redis and RabbitMQ URLs (one broker kind per deployment)"
    if url.lower().startswith("sentinel://"):
        names = parse_qs(url.partition("?")[2]).get("master_name", [])
        if not names or not names[0]:
            return "a sentinel:// broker URL needs ?master_name=NAME (the master the sentinels monitor)"
    return None


def _read_file(home: Path) -> dict[str, str]:
    path = home / CONFIG_FILE_NAME
    if not path.exists():
        return {}
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    unknown = sorted(set(data) - set(_KEYS))
    if unknown:
        raise ConfigError(f"unknown keys in {path}: {', '.join(unknown)}")
    return {k: str(v) for k, v in data.items()}


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Returns the settings from ``environ`` (default ``os.environ``) and ``$KMSQ_HOME/kmsq.toml``.

    Raises ConfigError for an unreadable or malformed configuration file, or a broker URL kmsq cannot use
    (:func:`broker_url_problem`).
    """
    env = os.environ if environ is None else environ
    home = Path(env.get("KMSQ_HOME") or "./var").expanduser().resolve()
    values = _read_file(home)
    for key in _KEYS:
        if env.get("KMSQ_" + key.upper()):
            values[key] = env["KMSQ_" + key.upper()]
    broker_url = values.get("broker_url") or None
    problem = broker_url_problem(broker_url) if broker_url else None
    if problem:
        source = "KMSQ_BROKER_URL" if env.get("KMSQ_BROKER_URL") else f"broker_url in {home / CONFIG_FILE_NAME}"
        raise ConfigError(f"{source}: {problem}")
    module = values.get("pkcs11_module") or None
    pin_file = values.get("pkcs11_pin_file")
    return Settings(
        home=home,
        database_url=values.get("database_url") or f"sqlite:///{home / 'kmsq.db'}",
        broker_url=broker_url,
        pkcs11_module=module,
        pkcs11_token_label=values.get("pkcs11_token_label") or EMBEDDED_TOKEN_LABEL,
        pkcs11_pin=values.get("pkcs11_pin") or None,
        pkcs11_pin_file=Path(pin_file).expanduser() if pin_file else None,
        default_pool=values.get("default_pool") or "default",
        clock_skew_seconds=_int(values, "clock_skew_seconds", DEFAULT_CLOCK_SKEW_SECONDS),
        cache_seconds=_int(values, "cache_seconds", 2),
        namespace=_namespace(values.get("namespace") or None),
        reply_grace_seconds=_int(values, "reply_grace_seconds", DEFAULT_REPLY_GRACE_SECONDS),
        audit_retention_seconds=_int(values, "audit_retention_seconds", DEFAULT_AUDIT_RETENTION_SECONDS),
        prune_interval_seconds=_int(values, "prune_interval_seconds", DEFAULT_PRUNE_INTERVAL_SECONDS),
        prune_batch=max(1, _int(values, "prune_batch", DEFAULT_PRUNE_BATCH)),
        reply_queue_ttl_seconds=max(1, _int(values, "reply_queue_ttl_seconds", DEFAULT_REPLY_QUEUE_TTL_SECONDS)),
        replicate_interval_seconds=_int(values, "replicate_interval_seconds", DEFAULT_REPLICATE_INTERVAL_SECONDS),
        schedule_interval_seconds=_int(values, "schedule_interval_seconds", DEFAULT_SCHEDULE_INTERVAL_SECONDS),
        min_tokens=max(1, _int(values, "min_tokens", 1)),
        require_sync_standby=_flag(values, "require_sync_standby"),
        operator_set=Path(values["operator_set"]).expanduser() if values.get("operator_set") else None,
        operator_key=tuple(Path(p).expanduser() for p in _split(values.get("operator_key", ""))),
    )


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def _namespace(value: str | None) -> str | None:
    try:
        namespace_key_prefix(value)
    except ValueError as e:
        raise ConfigError(f"KMSQ_NAMESPACE: {e}") from None
    return value


def _flag(values: Mapping[str, str], key: str) -> bool:
    raw = values.get(key, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise ConfigError(f"{key} must be 1 or 0, got {raw!r}")


def _int(values: Mapping[str, str], key: str, default: int) -> int:
    raw = values.get(key)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{key} must be an integer, got {raw!r}") from None
    if value < 0:
        raise ConfigError(f"{key} must not be negative")
    return value
