"""The wire contract: message models, canonical encodings and ciphertext formats. No I/O, no HSM."""
