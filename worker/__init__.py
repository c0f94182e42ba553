"""Everything that runs on an HSM host: config, the PKCS#11 adapter, storage and the key service.

Importable without a broker; only ``worker.hsm`` imports ``pkcs11``.
"""
