"""The replaced key provider's formats, quarantined here as pyca/cryptography keeps ``hazmat/decrepit``.

* :mod:`worker.legacy.sjcl`: the SJCL codec (sjcl 1.0.8 AES-CCM envelopes) of its ciphertexts;
* :mod:`worker.legacy.table_import`: ``kmsq import-legacy``, its ``private_keys`` table brought into kmsq;
* :mod:`worker.legacy.root_key_names`: its root key *names*, kept sealed so that the ``encryptedKey`` values it
  handed out still decrypt.

Nothing below :mod:`worker.pipeline` imports this package: the pipeline sends an SJCL ``encryptedKey`` here
before the service sees it (the only dispatch), and the legacy commands of ``kmsq`` use it directly. Imports
nothing heavy itself: the codec works without the worker extra.
"""
