"""The HTTP gateway over real HTTP (and HTTPS with client certificates), as a ``kmsq gateway`` subprocess in
front of the real workers (Redis, Postgres, SoftHSM2)."""

from __future__ import annotations

import datetime
import ssl
import time
import uuid
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from schemas.envelope import EncryptedDataKey, KeySpec, WrapAlgorithm
from schemas.limits import MAX_HTTP_BODY_BYTES
from tests.conftest import random_pub
from tests.gateway_fixtures import GATEWAY_OPS, Gateway, message_of, start_gateway
from tests.queue_fixtures import Deployment
from worker.legacy import sjcl


def test_openapi_lists_the_old_api(http: httpx.Client) -> None:
    spec = http.get("/openapi.json").json()
    assert {"/key", "/key/{pub}", "/generateDataKey", "/decryptDataKey"} <= set(spec["paths"])
    assert set(spec["paths"]["/key"]) == {"post"} and "get" in spec["paths"]["/key/{pub}"]


def test_data_keys_and_an_sjcl_client(deployment: Deployment, http: httpx.Client) -> None:
    generated = http.post("/generateDataKey", json={"keyType": "AES-256"})
    assert generated.status_code == 200, generated.text
    key = generated.json()
    assert set(key) == {"plaintextKey", "encryptedKey"} and len(key["plaintextKey"]) == 44
    assert key["encryptedKey"].startswith("kmsq:v1:")
    deployment.secrets.append(key["plaintextKey"].encode())

    # A wallet manager of the old API: encrypts its data with plaintextKey as the SJCL password, keeps only
    # the envelope and encryptedKey, and later gets the password back to decrypt.
    wallet = "wallet seed " + uuid.uuid4().hex
    envelope = sjcl.encrypt(key["plaintextKey"], wallet)
    del key["plaintextKey"]
    decrypted = http.post("/decryptDataKey", json={"encryptedKey": key["encryptedKey"]})
    assert decrypted.status_code == 200, decrypted.text
    assert set(decrypted.json()) == {"plaintextKey"}
    assert sjcl.decrypt(decrypted.json()["plaintextKey"], envelope) == wallet

    assert http.post("/generateDataKey", json={}).status_code == 200  # keyType defaults to AES-256


def test_data_key_errors(http: httpx.Client) -> None:
    assert "keyType" in message_of(http.post("/generateDataKey", json={"keyType": "AES-128"}), 400)
    assert "JSON" in message_of(http.post("/generateDataKey", content=b"{not json"), 400)
    assert "object" in message_of(http.post("/decryptDataKey", json=["kmsq:v1:AAAA"]), 400)
    assert "encryptedKey" in message_of(http.post("/decryptDataKey", json={}), 400)
    assert message_of(http.post("/decryptDataKey", json={"encryptedKey": "kmsq:v1:AAAA"}), 400) == (
        "ciphertext failed integrity check"
    )
    sjcl_envelope = sjcl.encrypt("old-root-key-name", "a data key of the old system")
    assert message_of(http.post("/decryptDataKey", json={"encryptedKey": sjcl_envelope}), 400)
    assert message_of(http.get("/generateDataKey"), 405) == "method not allowed"
    assert message_of(http.get("/nothing/here"), 404) == "not found"


def test_private_keys(deployment: Deployment, http: httpx.Client) -> None:
    pub, prv = random_pub() + "/a+b=c/", "xprv" + uuid.uuid4().hex
    deployment.secrets.append(prv.encode())
    body = {"prv": prv, "pub": pub, "coin": "btc", "source": "user", "type": "independent"}
    stored = http.post("/key", json=body)
    assert stored.status_code == 200, stored.text
    assert stored.json() == {"pub": pub, "coin": "btc", "source": "user", "type": "independent"}
    assert prv not in stored.text
    before = deployment.count("private_keys")
    message_of(http.post("/key", json=body), 409)
    assert message_of(http.post("/key", json={**body, "prv": prv + "-other"}), 409)
    assert deployment.count("private_keys") == before

    fetched = http.get(f"/key/{quote(pub, safe='')}", params={"source": "user"})
    assert fetched.status_code == 200, fetched.text
    assert fetched.json() == {"prv": prv, "pub": pub, "source": "user", "type": "independent"}
    # Unencoded slashes reach the same key: the path parameter takes the rest of the path.
    assert http.get(f"/key/{pub.replace('+', '%2B')}", params={"source": "user"}).json()["prv"] == prv

    message_of(http.get(f"/key/{quote(pub, safe='')}", params={"source": "backup"}), 404)
    message_of(http.get(f"/key/{quote(random_pub(), safe='')}", params={"source": "user"}), 404)
    assert "source" in message_of(http.get(f"/key/{quote(pub, safe='')}", params={"source": "cold"}), 400)
    assert "source" in message_of(http.get(f"/key/{quote(pub, safe='')}"), 400)


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"prv": None}, "prv"),
        ({"prv": ""}, "prv"),
        ({"coin": "btc\n"}, "coin must not contain control characters"),
        ({"coin": "c" * 129}, "coin must be at most 128 characters"),
        ({"pub": "xpub\x00"}, "pub must not contain control characters"),
        ({"source": "cold"}, "source"),
        ({"type": "multisig"}, "type"),
        ({"pub": 12}, "pub"),
    ],
)
def test_put_key_bad_bodies_change_nothing(
    deployment: Deployment, http: httpx.Client, change: dict[str, object], fragment: str
) -> None:
    body: dict[str, object] = {"prv": "xprv-bad-body", "pub": random_pub(), "coin": "btc", "source": "user"}
    body |= {"type": "tss"} | change
    body = {k: v for k, v in body.items() if v is not None}
    before = deployment.count("private_keys")
    message = message_of(http.post("/key", json=body), 400)
    assert fragment in message and "xprv-bad-body" not in message
    assert deployment.count("private_keys") == before


def test_oversized_body_is_refused(deployment: Deployment, http: httpx.Client) -> None:
    before = deployment.count("private_keys")
    huge = {"prv": "x" * MAX_HTTP_BODY_BYTES, "pub": random_pub(), "coin": "btc", "source": "user", "type": "tss"}
    assert message_of(http.post("/key", json=huge), 400) == f"request body exceeds {MAX_HTTP_BODY_BYTES} bytes"
    assert deployment.count("private_keys") == before


def test_no_worker_is_503_and_a_refused_gateway_is_500(deployment: Deployment) -> None:
    deployment.register("gateway-lean", ("generate_data_key",))
    fleet = deployment.service.fleet_document()
    fleet["pools"]["ghost"] = dict(fleet["pools"]["beta"], root_keys=["ghost-root"])  # no worker serves it
    lean = start_gateway(deployment, "gateway-lean", fleet, "--timeout", "2")
    try:
        with httpx.Client(base_url=lean.url, timeout=30) as http:
            nobody = EncryptedDataKey(KeySpec.AES_256, WrapAlgorithm.AES_KWP, "ghost-root", 1, b"\0" * 40)
            started = time.monotonic()
            assert message_of(http.post("/decryptDataKey", json={"encryptedKey": nobody.to_text()}), 503) == (
                "no worker answered in time"
            )
            assert time.monotonic() - started < 15
            body = {"prv": "xprv-forbidden", "pub": random_pub(), "coin": "btc", "source": "user", "type": "tss"}
            assert message_of(http.post("/key", json=body), 500) == "internal error"
        assert "forbidden" in lean.log.read_text()  # the operator sees why
    finally:
        lean.stop()


def _certificate(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[str, ec.EllipticCurvePrivateKey] | None, server: bool
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, signing_key = issuer or (subject, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if issuer is not None:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if server:
            import ipaddress

            san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
            builder = builder.add_extension(san, critical=False)
    return builder.sign(signing_key, hashes.SHA256())


def _write_pair(directory: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    (directory / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / f"{name}.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


def test_https_with_client_certificates(deployment: Deployment, gateway: Gateway, tmp_path: Path) -> None:
    ca_key, server_key, client_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = _certificate("kmsq test CA", ca_key, None, server=False)
    _write_pair(tmp_path, "ca", ca, ca_key)
    _write_pair(tmp_path, "server", _certificate("gateway", server_key, ("kmsq test CA", ca_key), True), server_key)
    _write_pair(tmp_path, "client", _certificate("wallet", client_key, ("kmsq test CA", ca_key), False), client_key)
    secure = start_gateway(
        deployment, "gateway", deployment.service.fleet_document(),
        "--tls-cert", str(tmp_path / "server.crt"), "--tls-key", str(tmp_path / "server.key"),
        "--client-ca", str(tmp_path / "ca.crt"), label="-tls",
    )  # fmt: skip
    try:
        trust = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
        with_cert = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
        with_cert.load_cert_chain(str(tmp_path / "client.crt"), str(tmp_path / "client.key"))
        with httpx.Client(base_url=secure.url, verify=with_cert, timeout=60) as http:
            key = http.post("/generateDataKey", json={"keyType": "AES-256"})
            assert key.status_code == 200, key.text
            deployment.secrets.append(key.json()["plaintextKey"].encode())
        with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
            httpx.Client(base_url=secure.url, verify=trust, timeout=10).post("/generateDataKey", json={})
        with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
            httpx.Client(base_url=secure.url.replace("https", "http"), timeout=10).get("/openapi.json")
    finally:
        secure.stop()


def test_several_gateway_processes_share_the_socket_and_stop_together(deployment: Deployment) -> None:
    """``--processes 2``: both processes serve the one port (each with its own client and reply queue, so each
    gets its own answers), and SIGTERM stops both; the command exits 0."""
    import re
    from concurrent.futures import ThreadPoolExecutor

    deployment.register("gateway-pair", GATEWAY_OPS)
    running = start_gateway(deployment, "gateway-pair", deployment.service.fleet_document(), "--processes", "2",
                            "--timeout", "30")  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while len(re.findall(r"Application startup complete", running.log.read_text())) < 2:
            assert time.monotonic() < deadline, running.log.read_text()[-2000:]
            time.sleep(0.1)

        def round_trip(_: int) -> bool:
            with httpx.Client(base_url=running.url, timeout=60) as http:  # a connection each: both processes
                made = http.post("/generateDataKey", json={}).json()
                back = http.post("/decryptDataKey", json={"encryptedKey": made["encryptedKey"]}).json()
                return bool(back == {"plaintextKey": made["plaintextKey"]})

        with ThreadPoolExecutor(max_workers=8) as pool:
            assert all(pool.map(round_trip, range(40)))
        served = set(re.findall(r"Started server process \[(\d+)\]", running.log.read_text()))
        assert len(served) == 2
    finally:
        running.process.terminate()
        assert running.process.wait(timeout=30) == 0
    assert len(re.findall(r"Finished server process", running.log.read_text())) == 2
