"""What BitGo's Advanced Wallet Manager sends (``KeyProviderClient`` of BitGo/advanced-wallets), over real HTTP to
a ``kmsq gateway`` in front of the real workers: ECDSA MPCv2 (DKLS) key shares of about 330,000 characters,
token coin names, every limit at its edge, 405 with ``Allow``, and the SDK's and the worker's side of the
same limits."""

from __future__ import annotations

import base64
import itertools
import os
import uuid
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from sqlalchemy import select, update

from schemas.limits import (
    MAX_COIN_CHARS,
    MAX_ENCRYPTED_KEY_CHARS,
    MAX_PRV_BYTES,
    MAX_PUB_CHARS,
    MAX_REQUEST_BYTES,
)
from schemas.wire import seal_private_key
from tasks.client import KmsClient, KmsError, put_keys_batches
from tests.conftest import random_pub
from tests.gateway_fixtures import message_of
from tests.queue_fixtures import Deployment
from tests.test_queue_rejections import put_body, rejection, signed_args
from worker.storage.db import transaction
from worker.storage.models import PrivateKey

# base64(keyShare.toBytes()) of a 2-of-3 DKLS share (@silencelaboratories/dkls-wasm-ll-node 1.2.0-pre.4):
# 246,966-247,236 bytes, so about 330,000 characters.
SHARE_BYTES = 247_500


def key_share(deployment: Deployment) -> str:
    """A random key share of exactly 330,000 base64 characters; a slice of it joins the secrets scan."""
    share = base64.b64encode(os.urandom(SHARE_BYTES)).decode()
    assert len(share) == 330_000
    deployment.secrets.append(share[999:1095].encode())  # 3-aligned: its base64 form is inside the share's
    return share


def put(http: httpx.Client, pub: str, prv: str, coin: str = "hteth", source: str = "user") -> httpx.Response:
    """``POST /key`` as the wallet manager's MPCv2 finalize step sends it."""
    return http.post("/key", json={"prv": prv, "pub": pub, "coin": coin, "source": source, "type": "tss"})


def get(http: httpx.Client, pub: str, source: str = "user") -> httpx.Response:
    return http.get(f"/key/{quote(pub, safe='')}", params={"source": source})


def stored(deployment: Deployment, pub: str) -> PrivateKey | None:
    with deployment.sessions() as db:
        return db.scalars(select(PrivateKey).where(PrivateKey.pub == pub)).first()


def test_an_mpcv2_key_share_round_trips_byte_identically(deployment: Deployment, http: httpx.Client) -> None:
    share, pub = key_share(deployment), random_pub()
    answer = put(http, pub, share)
    assert answer.status_code == 200, answer.text[:300]
    assert answer.json() == {"pub": pub, "coin": "hteth", "source": "user", "type": "tss"}
    fetched = get(http, pub)
    assert fetched.status_code == 200
    assert fetched.json()["prv"].encode() == share.encode() and fetched.json()["type"] == "tss"
    assert share not in (stored(deployment, pub) or PrivateKey()).encrypted_prv


@pytest.mark.parametrize("n", [16_384, 16_385, 24_528, 24_529, 32_768, 32_769])
def test_sizes_that_used_to_be_refused_are_stored(deployment: Deployment, http: httpx.Client, n: int) -> None:
    pub = random_pub()
    prv = "a" * (n - 8) + uuid.uuid4().hex[:8]
    assert put(http, pub, prv).status_code == 200
    assert get(http, pub).json()["prv"] == prv


@pytest.mark.parametrize(
    ("unit", "count"),
    [("a", MAX_PRV_BYTES), ("\u00e9", MAX_PRV_BYTES // 2), ("\u20ac", MAX_PRV_BYTES // 3)],
    ids=["ascii", "2-byte", "3-byte"],
)
def test_prv_exactly_at_the_limit_is_stored_and_one_byte_over_is_refused(
    deployment: Deployment, http: httpx.Client, unit: str, count: int
) -> None:
    at_limit = unit * (count - 1) + "a" * (MAX_PRV_BYTES - len(unit.encode()) * (count - 1))
    assert len(at_limit.encode()) == MAX_PRV_BYTES
    pub = random_pub()
    answer = put(http, pub, at_limit)
    assert answer.status_code == 200, answer.text[:300]
    assert get(http, pub).json()["prv"] == at_limit

    over, over_pub = at_limit + "a", random_pub()
    before = deployment.count("private_keys")
    assert message_of(put(http, over_pub, over), 400) == "prv must be at most 1048576 bytes"
    assert deployment.count("private_keys") == before and stored(deployment, over_pub) is None
    message_of(get(http, over_pub), 404)


def test_the_sdk_and_the_worker_apply_the_same_prv_limit(deployment: Deployment, client: KmsClient) -> None:
    pub = random_pub()
    with pytest.raises(KmsError) as refused:  # the SDK refuses before it seals
        client.put_key(pub, "x" * (MAX_PRV_BYTES + 1), "btc", "user", "tss")
    assert (refused.value.code, refused.value.message) == ("invalid", "prv must be at most 1048576 bytes")

    # A caller that skips the SDK's check: the worker refuses the oversized seal before opening it.
    body = put_body(client, pub)
    rid = uuid.UUID(body["request_id"])
    body["params"]["prv"] = seal_private_key(
        client.fleet.pools["alpha"].transport_key, client.identity.caller, rid, b"x" * (MAX_PRV_BYTES + 1)
    )
    before = deployment.count("private_keys")
    error = rejection(client, "kmsq.put_key", signed_args(client.identity, body, "kmsq.put_key"), str(rid))
    assert (error.code, error.message) == ("invalid", "prv must be at most 1048576 bytes")
    assert deployment.count("private_keys") == before

    at_limit = "y" * MAX_PRV_BYTES
    assert client.put_key(pub, at_limit, "btc", "user", "tss")["pub"] == pub
    assert client.get_key(pub, "user")["prv"] == at_limit


COINS = [
    "hteth:bgerchv2",
    "sol:usdc",
    "tBTC",
    "hteth:0x5b1a7e1f0e8bd6e7b1d3a2f9c4e5d6a7b8c9d0e1",  # an ERC-20 token by contract address: 47 characters
    "c" * MAX_COIN_CHARS,
    "t\u00f6ken \u2014 with spaces",
]


@pytest.mark.parametrize("coin", COINS, ids=["token", "sol-token", "mixed-case", "contract", "longest", "unicode"])
def test_any_coin_name_is_kept_exactly(
    deployment: Deployment, http: httpx.Client, client: KmsClient, coin: str
) -> None:
    pub = random_pub()
    answer = put(http, pub, "xprv-coin-" + uuid.uuid4().hex, coin=coin)
    assert answer.status_code == 200, answer.text
    assert answer.json()["coin"] == coin
    assert client.get_key(pub, "user")["coin"] == coin
    row = stored(deployment, pub)
    assert row is not None and row.coin == coin


def test_the_coin_stays_bound_to_the_ciphertext(deployment: Deployment, http: httpx.Client, client: KmsClient) -> None:
    pub = random_pub()
    assert put(http, pub, "xprv-bound-" + uuid.uuid4().hex, coin="tBTC").status_code == 200
    with transaction(deployment.sessions) as db:  # an attacker with the database renames the coin
        db.execute(update(PrivateKey).where(PrivateKey.pub == pub).values(coin="tbtc"))
    with pytest.raises(KmsError) as error:
        client.get_key(pub, "user")
    assert (error.value.code, error.value.message) == ("invalid", "ciphertext failed integrity check")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("coin", "c" * (MAX_COIN_CHARS + 1), "coin must be at most 128 characters"),
        ("coin", "btc\x00", "coin must not contain control characters"),
        ("coin", "btc\u0085", "coin must not contain control characters"),
        ("coin", "", "coin must not be empty"),
        ("pub", "p" * (MAX_PUB_CHARS + 1), "pub must be at most 1024 characters"),
        ("prv", "", "prv must not be empty"),
    ],
)
def test_out_of_range_fields_name_the_field(
    deployment: Deployment, http: httpx.Client, client: KmsClient, field: str, value: str, message: str
) -> None:
    body = {"prv": "xprv-" + uuid.uuid4().hex, "pub": random_pub(), "coin": "btc", "source": "user", "type": "tss"}
    body[field] = value
    before = deployment.count("private_keys")
    assert message_of(http.post("/key", json=body), 400) == message
    with pytest.raises(KmsError) as error:  # the SDK, with the message models the worker uses, says the same
        client.put_key(body["pub"], body["prv"], body["coin"], "user", "tss")
    assert (error.value.code, error.value.message) == ("invalid", message)
    assert deployment.count("private_keys") == before


def test_encrypted_keys_have_one_limit_everywhere(http: httpx.Client, client: KmsClient) -> None:
    longest = "kmsq:v1:" + "A" * (MAX_ENCRYPTED_KEY_CHARS - 8)
    # Within the limit the worker gets it and finds it is no ciphertext; one character more is a field error.
    assert message_of(http.post("/decryptDataKey", json={"encryptedKey": longest}), 400) == (
        "ciphertext failed integrity check"
    )
    too_long = "encryptedKey must be at most 8192 characters"
    assert message_of(http.post("/decryptDataKey", json={"encryptedKey": longest + "A"}), 400) == too_long
    with pytest.raises(KmsError) as error:
        client.decrypt_data_key(longest + "A")
    assert error.value.message == too_long
    items = client.decrypt_data_keys([longest, longest + "A"])["items"]
    assert [item.get("message") for item in items] == ["ciphertext failed integrity check", too_long]


def test_openapi_states_the_limits_of_schemas_limits(http: httpx.Client) -> None:
    spec = http.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    put_body_fields = schemas["PutKeyBody"]["properties"]
    assert put_body_fields["prv"]["maxLength"] == MAX_PRV_BYTES
    assert put_body_fields["pub"]["maxLength"] == MAX_PUB_CHARS
    assert put_body_fields["coin"]["maxLength"] == MAX_COIN_CHARS and "pattern" in put_body_fields["coin"]
    assert schemas["DecryptDataKeyBody"]["properties"]["encryptedKey"]["maxLength"] == MAX_ENCRYPTED_KEY_CHARS
    pub_parameter = spec["paths"]["/key/{pub}"]["get"]["parameters"][0]
    assert pub_parameter["name"] == "pub" and pub_parameter["schema"]["maxLength"] == MAX_PUB_CHARS
    # Bad requests are 400 {"message"}, as documented; FastAPI's 422 is never answered, so never listed.
    for path in spec["paths"].values():
        for operation in path.values():
            assert "422" not in operation["responses"] and "400" in operation["responses"]


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [("PUT", "/key", "POST"), ("DELETE", "/key/xpub-1", "GET"), ("GET", "/generateDataKey", "POST"),
     ("PATCH", "/decryptDataKey", "POST")],
)  # fmt: skip
def test_405_answers_carry_allow(http: httpx.Client, method: str, path: str, allow: str) -> None:
    answer = http.request(method, path)
    assert message_of(answer, 405) == "method not allowed"
    assert answer.headers["allow"] == allow


def test_large_put_keys_batches_are_split_by_size(deployment: Deployment, client: KmsClient) -> None:
    items = [
        {"pub": random_pub(), "prv": key_share(deployment), "coin": "hteth", "source": "backup", "type": "tss"}
        for _ in range(26)
    ]
    # 26 shares are 8.6 MB of private keys: more than one message may carry.
    with pytest.raises(KmsError) as error:
        client.put_keys(items)
    assert error.value.code == "invalid" and f"at most {MAX_REQUEST_BYTES} bytes" in error.value.message
    ranges = put_keys_batches(items)
    assert len(ranges) > 1 and ranges[0][0] == 0 and ranges[-1][1] == len(items)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    for start, stop in ranges:
        answers = client.put_keys(items[start:stop])["items"]
        assert all("error" not in answer for answer in answers)
    for item in items[::5]:
        assert client.get_key(item["pub"], "backup")["prv"] == item["prv"]


def test_a_put_keys_item_over_the_limit_fails_alone(deployment: Deployment, client: KmsClient) -> None:
    good = {"pub": random_pub(), "prv": "xprv-" + uuid.uuid4().hex, "coin": "tBTC", "source": "user", "type": "tss"}
    big = {**good, "pub": random_pub(), "prv": "z" * (MAX_PRV_BYTES + 1)}
    answers = client.put_keys([good, big])["items"]
    assert answers[0] == {k: good[k] for k in ("pub", "coin", "source", "type")}
    assert answers[1] == {"error": "invalid", "message": "prv must be at most 1048576 bytes"}
    assert stored(deployment, big["pub"]) is None and client.get_key(good["pub"], "user")["coin"] == "tBTC"


def rss_kib(pids: list[int]) -> int:
    """The summed VmRSS of ``pids`` in KiB."""
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def test_worker_memory_stays_bounded_over_100_large_keys(deployment: Deployment, client: KmsClient) -> None:
    """100 puts and 100 gets of 330,000-character keys: the worker's RSS levels off instead of growing per key."""
    worker = deployment.workers["alpha"]
    pids = [*worker.children(), worker.process.pid]
    samples = []
    for round_ in range(10):
        pubs = []
        for _ in range(10):
            pub, share = random_pub(), key_share(deployment)
            client.put_key(pub, share, "hteth", "user", "tss")
            pubs.append((pub, share))
        for pub, share in pubs:
            assert client.get_key(pub, "user")["prv"] == share
        samples.append(rss_kib(pids))
        if round_ == 1:
            warmed = samples[-1]
    growth_mib = (max(samples[2:]) - warmed) / 1024
    # Each key is 0.33 MB and travels 4 times (sealed request, stored row, sealed reply): a leak of even one
    # copy per key would add 33 MB over the 100.
    assert growth_mib < 24, (growth_mib, samples)
