"""The JSON files kmsq hands out: their ``kind`` and version, defined once for writers and readers.

* ``NAME.key.json`` (``kmsq caller keygen``): a caller's private identity, read by the SDK.
* ``NAME.pub.json``: its public half, read by ``kmsq caller add``.
* the fleet file (``kmsq fleet-key export``): each pool's public fleet keys and root keys, read by the SDK.
"""

from __future__ import annotations

FILE_VERSION = 1
IDENTITY_KIND = "kmsq-caller-identity"
PUBLIC_IDENTITY_KIND = "kmsq-caller-public"
FLEET_KIND = "kmsq-fleet"
