"""The fault-injecting PKCS#11 module (kmsq.chaos) in front of SoftHSM2, with the real ``worker.hsm.Hsm`` adapter.

The faulty module runs in a child process: SoftHSM2 is one library instance per process, and this process has
already initialized it directly (the ``hsm`` fixture), so the fault module's C_Initialize of the same instance
would fail with CKR_CRYPTOKI_ALREADY_INITIALIZED.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from kmsq.chaos.hsm_faults import (
    CKR_DEVICE_ERROR,
    CKR_DEVICE_REMOVED,
    CKR_SESSION_HANDLE_INVALID,
    ChaosError,
    FaultSwitch,
    build_fault_module,
    fault_environment,
)
from worker.config import Settings

REPO = Path(__file__).resolve().parents[1]

# Runs in the child: the real adapter on the fault module, faults switched on and off between calls.
# Reads its parameters as JSON on stdin and prints its observations as one JSON line.
_CHILD = r"""
import json, os, sys
from pathlib import Path

from kmsq.chaos.hsm_faults import FaultSwitch
from worker.errors import ServiceError
from worker.hsm import Hsm

args = json.load(sys.stdin)
switch = FaultSwitch(Path(os.environ["KMSQ_FAULT_FILE"]))
hsm = Hsm(args["module"], args["token_label"], lambda: args["pin"], Path(args["softhsm2_conf"]))


def attempt(call):
    try:
        call()
        return {"ok": True}
    except ServiceError as e:
        cause = e.__cause__
        return {"ok": False, "error": type(e).__name__, "cause": None if cause is None else type(cause).__name__}


def same(a, b):
    return bytes(a.view()) == bytes(b.view())


out = {}
root = hsm.create_aes_root_key(args["key_id"], 1)
before, plain_before = hsm.generate_data_key(root, readable=True)
out["unwrap_before"] = same(hsm.unwrap_data_key(root, before), plain_before)

if args["scenario"] == "window":
    switch.fail(args["code"])
    out["active"] = switch.active
    out["generate_in_fault"] = attempt(lambda: hsm.generate_data_key(root, readable=True))
    out["unwrap_in_fault"] = attempt(lambda: hsm.unwrap_data_key(root, before))
    out["create_in_fault"] = attempt(lambda: hsm.create_aes_root_key(args["key_id"], 2))
    switch.clear()
    out["active_after_clear"] = switch.active
    after, plain_after = hsm.generate_data_key(root, readable=True)
    out["unwrap_across_window"] = same(hsm.unwrap_data_key(root, before), plain_before)
    out["unwrap_after"] = same(hsm.unwrap_data_key(root, after), plain_after)
elif args["scenario"] == "formats":
    for text in args["contents"]:
        switch.path.write_text(text, encoding="ascii")
        out[repr(text)] = attempt(lambda: hsm.generate_data_key(root, readable=False))
        switch.clear()

print(json.dumps(out))
"""


@pytest.fixture
def fault_module(tmp_path: Path) -> Path:
    """The fault module, compiled for this test."""
    return build_fault_module(tmp_path / "build")


def run_child(
    monkeypatch: pytest.MonkeyPatch, settings: Settings, module: Path, switch: FaultSwitch, **args: Any
) -> dict[str, Any]:
    """Runs ``_CHILD`` with the fault environment and returns what it printed (parsed JSON)."""
    for name, value in fault_environment(settings.module_path(), switch).items():
        monkeypatch.setenv(name, value)
    params = {
        "module": str(module),
        "token_label": settings.pkcs11_token_label,
        "pin": settings.read_pin(),
        "softhsm2_conf": str(settings.softhsm2_conf),
        "key_id": f"faults-{uuid.uuid4().hex[:12]}",
        **args,
    }
    result = subprocess.run(
        [sys.executable, "-c", _CHILD],
        input=json.dumps(params),
        env=dict(os.environ),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    parsed: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return parsed


@pytest.mark.hsm
@pytest.mark.parametrize("code", [CKR_DEVICE_REMOVED, CKR_SESSION_HANDLE_INVALID, CKR_DEVICE_ERROR])
def test_fault_window_fails_then_heals(
    hsm_settings: Settings, fault_module: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    switch = FaultSwitch(tmp_path / "hsm-fault")
    out = run_child(monkeypatch, hsm_settings, fault_module, switch, scenario="window", code=code)

    cause = {
        CKR_DEVICE_REMOVED: "DeviceRemoved",
        CKR_SESSION_HANDLE_INVALID: "SessionHandleInvalid",
        CKR_DEVICE_ERROR: "DeviceError",
    }[code]
    unavailable = {"ok": False, "error": "HsmUnavailable", "cause": cause}
    assert out["unwrap_before"] is True  # no fault: root key, data key, round trip
    assert out["active"] is True
    assert out["generate_in_fault"] == unavailable
    assert out["unwrap_in_fault"] == unavailable
    assert out["create_in_fault"] == unavailable
    assert out["active_after_clear"] is False
    assert out["unwrap_across_window"] is True  # wrapped before the fault, unwrapped after it
    assert out["unwrap_after"] is True  # the adapter reopened its session


@pytest.mark.hsm
def test_switch_file_formats(
    hsm_settings: Settings, fault_module: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    switch = FaultSwitch(tmp_path / "hsm-fault")
    contents = ["50", " 0x32\n", "0XB3", "", "\n", "junk", "0", "0x", "-50"]
    out = run_child(monkeypatch, hsm_settings, fault_module, switch, scenario="formats", contents=contents)

    assert out["unwrap_before"] is True
    assert out[repr("50")] == {"ok": False, "error": "HsmUnavailable", "cause": "DeviceRemoved"}
    assert out[repr(" 0x32\n")] == {"ok": False, "error": "HsmUnavailable", "cause": "DeviceRemoved"}
    assert out[repr("0XB3")] == {"ok": False, "error": "HsmUnavailable", "cause": "SessionHandleInvalid"}
    for no_fault in ("", "\n", "junk", "0", "0x", "-50"):
        assert out[repr(no_fault)] == {"ok": True}, no_fault


def test_switch_writes_and_clears(tmp_path: Path) -> None:
    switch = FaultSwitch(tmp_path / "hsm-fault")
    assert not switch.active
    switch.clear()  # missing is fine
    switch.fail(CKR_DEVICE_REMOVED)
    assert switch.active
    assert switch.path.read_text(encoding="ascii") == "0x32\n"
    switch.fail(CKR_SESSION_HANDLE_INVALID)
    assert switch.path.read_text(encoding="ascii") == "0xb3\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hsm-fault"]  # no temporary file left behind
    switch.clear()
    assert not switch.active
    with pytest.raises(ValueError):
        switch.fail(0)


def test_fault_environment(tmp_path: Path) -> None:
    switch = FaultSwitch(tmp_path / "hsm-fault")
    assert fault_environment("/usr/lib/softhsm/libsofthsm2.so", switch) == {
        "KMSQ_FAULT_REAL_MODULE": "/usr/lib/softhsm/libsofthsm2.so",
        "KMSQ_FAULT_FILE": str(tmp_path / "hsm-fault"),
    }


def test_build_without_compiler(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(ChaosError, match="needs a C compiler, but neither cc nor gcc is on PATH"):
        build_fault_module(tmp_path / "build")
    assert not (tmp_path / "build").exists()
