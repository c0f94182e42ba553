"""The embedded HSM: a SoftHSM2 token that kmsq creates under ``KMSQ_HOME`` when no PKCS#11 module is set.

PINs are random, written to 0600 files, and handed to ``softhsm2-util`` through a pseudo-terminal, never on
its command line (where other local users could read them from the process list).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from pathlib import Path

from worker.config import Settings
from worker.errors import ConfigError


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(path, 0o600)


def _write_conf(settings: Settings) -> None:
    settings.token_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    settings.softhsm2_conf.write_text(
        f"directories.tokendir = {settings.token_dir}\nobjectstore.backend = file\nlog.level = ERROR\n"
        "slots.removable = false\n",
        encoding="utf-8",
    )


def _token_exists(settings: Settings) -> bool:
    util = shutil.which("softhsm2-util")
    if util is None:
        raise ConfigError("softhsm2-util not found (install the softhsm2 package or set KMSQ_PKCS11_MODULE)")
    env = dict(os.environ, SOFTHSM2_CONF=str(settings.softhsm2_conf))
    out = subprocess.run([util, "--show-slots"], env=env, capture_output=True, text=True, check=False)
    return any(
        line.strip().startswith("Label:") and line.split(":", 1)[1].strip() == settings.pkcs11_token_label
        for line in out.stdout.splitlines()
    )


def _init_token(settings: Settings, so_pin: str, user_pin: str) -> None:
    util = shutil.which("softhsm2-util")
    assert util is not None
    env = dict(os.environ, SOFTHSM2_CONF=str(settings.softhsm2_conf))
    master, slave = os.openpty()
    try:
        proc = subprocess.Popen(
            [util, "--init-token", "--free", "--label", settings.pkcs11_token_label],
            stdin=slave,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
        os.close(slave)
        slave = -1
        os.write(master, f"{so_pin}\n{so_pin}\n{user_pin}\n{user_pin}\n".encode("ascii"))
        output, _ = proc.communicate(timeout=60)
    finally:
        os.close(master)
        if slave != -1:
            os.close(slave)
    if proc.returncode != 0:
        message = output.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no output"]
        raise ConfigError(f"softhsm2-util could not create the token: {message[0]}")


def ensure_embedded_token(settings: Settings) -> bool:
    """Creates the embedded SoftHSM2 token if it does not exist yet.

    Returns True when it created one. Raises ConfigError when SoftHSM2 is not installed or the token cannot
    be created. Never touches a token kmsq did not create (only ``KMSQ_HOME``'s own token directory).
    """
    if not settings.embedded_hsm:
        raise ConfigError("refusing to create a token: KMSQ_PKCS11_MODULE names an external HSM")
    settings.module_path()  # fails early and clearly when the library is missing
    settings.home.mkdir(parents=True, exist_ok=True)
    if not settings.softhsm2_conf.exists():
        _write_conf(settings)
    if _token_exists(settings):
        return False
    user_pin = secrets.token_urlsafe(24)
    so_pin = secrets.token_urlsafe(24)
    _init_token(settings, so_pin, user_pin)
    _write_private(settings.embedded_pin_file, user_pin + "\n")
    _write_private(settings.home / "hsm-so.pin", so_pin + "\n")
    return True
