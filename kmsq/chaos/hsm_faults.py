"""HSM faults on demand: builds the fault-injecting PKCS#11 module (``faulty_pkcs11.c``) and drives its switch.

Test tooling, not production code. The module wraps the real PKCS#11 module (SoftHSM2); a process that loads
it with :func:`fault_environment` in its environment sees the token fail with a chosen ``CK_RV`` whenever
:meth:`FaultSwitch.fail` is on, and work normally again after :meth:`FaultSwitch.clear`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

CKR_DEVICE_ERROR = 0x30
CKR_DEVICE_REMOVED = 0x32
CKR_SESSION_HANDLE_INVALID = 0xB3

SOURCE = Path(__file__).with_name("faulty_pkcs11.c")
_COMPILERS = ("cc", "gcc")
_MAX_STDERR = 2000
_MAX_CK_RV = 0xFFFFFFFF


class ChaosError(Exception):
    """The fault tooling cannot run here (a tool is missing or did not start)."""


def build_fault_module(out_dir: Path) -> Path:
    """Compiles ``faulty_pkcs11.c`` with the first of ``cc``/``gcc`` on PATH into ``out_dir/faulty_pkcs11.so``.

    Returns the path of the shared object. Raises ChaosError when no C compiler is installed, the source is
    missing, or compilation fails (the message carries the compiler's stderr, truncated).
    """
    compiler = next((found for name in _COMPILERS if (found := shutil.which(name)) is not None), None)
    if compiler is None:
        raise ChaosError("the HSM fault module needs a C compiler, but neither cc nor gcc is on PATH")
    if not SOURCE.is_file():
        raise ChaosError(f"the HSM fault module's source is missing: {SOURCE}")
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / "faulty_pkcs11.so"
    command = [compiler, "-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-o", str(target), str(SOURCE), "-ldl"]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ChaosError(f"cannot run the C compiler {compiler}: {e}") from None
    if result.returncode != 0:
        stderr = result.stderr.strip()
        if len(stderr) > _MAX_STDERR:
            stderr = stderr[:_MAX_STDERR] + " ...(truncated)"
        raise ChaosError(f"compiling the HSM fault module failed ({compiler}, exit {result.returncode}): {stderr}")
    return target


class FaultSwitch:
    """The file the fault module reads on every wrapped call: holds a ``CK_RV`` while the token should fail."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, rv: int) -> None:
        """Makes every wrapped PKCS#11 call return ``rv`` from now on (written atomically, as ``0x..``).

        Raises ValueError when ``rv`` is not a non-zero 32-bit code (zero would mean "no fault"), OSError when
        the file cannot be written.
        """
        if not 0 < rv <= _MAX_CK_RV:
            raise ValueError(f"not a PKCS#11 error code: {rv!r}")
        fd, temp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="ascii") as out:
                out.write(f"{rv:#x}\n")
            os.replace(temp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise

    def clear(self) -> None:
        """Ends the fault: removes the file (a missing file is fine). Raises OSError when it cannot be removed."""
        self.path.unlink(missing_ok=True)

    @property
    def active(self) -> bool:
        """True while the switch file exists (the fault module then fails calls if it holds a non-zero code)."""
        return self.path.exists()


def fault_environment(real_module: str, switch: FaultSwitch) -> dict[str, str]:
    """Returns the environment variables a process needs to load the fault module in front of ``real_module``."""
    return {"KMSQ_FAULT_REAL_MODULE": real_module, "KMSQ_FAULT_FILE": str(switch.path)}
