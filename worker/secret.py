"""A holder for plaintext key material: a ``bytearray`` with a redacted repr, wiped on exit.

Python cannot guarantee that no copy of a secret survives (immutable ``bytes`` returned by libraries, the
allocator, swap); this holder keeps the copies kmsq owns in one mutable buffer and zeroes it as soon as the
operation ends. It refuses to be pickled so that it never reaches a message, a result backend or a log by
accident.
"""

from __future__ import annotations

import base64
import contextlib
from types import TracebackType
from typing import NoReturn


class SecretBytes:
    """Mutable secret buffer. Use as a context manager, or call :meth:`wipe` in ``finally``."""

    __slots__ = ("_buf",)

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._buf = bytearray(data)

    @classmethod
    def from_str(cls, text: str) -> SecretBytes:
        """Returns a holder of ``text`` encoded as UTF-8."""
        return cls(text.encode("utf-8"))

    def view(self) -> bytearray:
        """Returns the live buffer (not a copy); valid until :meth:`wipe`."""
        return self._buf

    def b64(self) -> str:
        """Returns the standard base64 encoding of the secret, with padding."""
        return base64.b64encode(self._buf).decode("ascii")

    def text(self) -> str:
        """Returns the secret decoded as UTF-8. Raises ``UnicodeDecodeError`` if it is not UTF-8."""
        return self._buf.decode("utf-8")

    def wipe(self) -> None:
        """Overwrites the buffer with zeros in place, then empties it."""
        self._buf[:] = bytes(len(self._buf))
        # While someone holds a memoryview the buffer cannot shrink; it stays zeroed at its size.
        with contextlib.suppress(BufferError):
            self._buf.clear()

    def __len__(self) -> int:
        return len(self._buf)

    def __repr__(self) -> str:
        return f"SecretBytes(<redacted {len(self._buf)} bytes>)"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        raise TypeError("SecretBytes cannot be pickled")

    def __enter__(self) -> SecretBytes:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.wipe()
