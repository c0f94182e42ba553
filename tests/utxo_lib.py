"""BitGo's own ``@bitgo/utxo-lib`` (npm, pinned in tests/interop/package.json), driven through
``tests/interop/utxo.js``: it builds wallet PSBTs the way BitGo's platform does, and checks and finalizes what
kmsq signed. ``scripts/test.sh`` installs node and the package; without them these tests skip locally and fail
on CI."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import missing_service

INTEROP = Path(__file__).parent / "interop"


class UtxoLibError(Exception):
    """utxo-lib refused: the one-line message utxo.js wrote."""


@dataclass(frozen=True)
class UtxoLib:
    node: str

    def run(self, command: str, request: dict[str, Any]) -> dict[str, Any]:
        """Returns what ``utxo.js <command>`` answers to ``request``. Raises UtxoLibError when it refuses."""
        done = subprocess.run(
            [self.node, str(INTEROP / "utxo.js"), command], input=json.dumps(request), capture_output=True,
            text=True, timeout=120, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise UtxoLibError(done.stderr.strip())
        answer: dict[str, Any] = json.loads(done.stdout)
        return answer

    def build(
        self, network: str, xpubs: list[str], inputs: list[dict[str, Any]],
        outputs: list[dict[str, Any]] | None = None, *, global_xpubs: bool = False,
    ) -> str:  # fmt: skip
        """Returns the hex of an unsigned wallet PSBT spending ``inputs`` to ``outputs`` (wallet outputs
        ``{scriptType, chain?, index, value}`` or payments ``{address, value}``; default one change output less a
        small fee), naming the wallet's keys as global xpubs when ``global_xpubs``, as BitGo's platform does."""
        request: dict[str, Any] = {"network": network, "xpubs": xpubs, "inputs": inputs, "globalXpubs": global_xpubs}
        if outputs is not None:
            request["outputs"] = outputs
        return str(self.run("build", request)["psbt"])

    def signed_by(self, network: str, xpubs: list[str], psbt: str) -> list[set[str]]:
        """Returns, per input, which of user/backup/bitgo signed it validly. Raises UtxoLibError when any
        signature present does not verify."""
        answer = self.run("verify", {"network": network, "xpubs": xpubs, "psbt": psbt})
        return [{name for name, signed in item["signedBy"].items() if signed} for item in answer["inputs"]]

    def finalize(self, network: str, psbt: str) -> dict[str, str]:
        """Returns ``{tx, txid}`` of the finalized PSBT. Raises UtxoLibError when it does not finalize."""
        return self.run("finalize", {"network": network, "psbt": psbt})

    def sign(self, network: str, psbt: str, xprv: str) -> str:
        """Returns ``psbt`` signed by ``xprv`` with BitGo's own signer."""
        return str(self.run("sign", {"network": network, "psbt": psbt, "xprv": xprv})["psbt"])

    def script_pubkey(self, script_type: str, pubkeys: list[bytes]) -> bytes:
        """Returns BitGo's ``script_type`` output script of the compressed keys ``pubkeys`` = (user, backup, bitgo)."""
        answer = self.run("script", {"scriptType": script_type, "pubkeys": [key.hex() for key in pubkeys]})
        return bytes.fromhex(answer["scriptPubKey"])

    def keys(self) -> tuple[list[str], list[str]]:
        """Returns three random depth-0 roots: (xprvs, xpubs)."""
        answer = self.run("keys", {})
        return answer["xprvs"], answer["xpubs"]


@pytest.fixture(scope="session")
def utxo_lib() -> UtxoLib:
    node = shutil.which("node")
    if node is None or not (INTEROP / "node_modules" / "@bitgo" / "utxo-lib").is_dir():
        missing_service("node and @bitgo/utxo-lib (npm ci --prefix tests/interop)")
    assert node is not None
    return UtxoLib(node)
