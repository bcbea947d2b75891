"""Self-signed certificates for the tests that serve TLS (openssl; CI must have it)."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest


def self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for DNS name `name` (its own CA) and its key, as files."""
    if shutil.which("openssl") is None:
        if os.environ.get("CI"):
            pytest.fail("openssl is not installed, and CI must run the TLS tests")
        pytest.skip("openssl is not installed")
    key, cert = directory / f"{name}.key", directory / f"{name}.crt"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-days", "1", "-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name}",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return cert, key
