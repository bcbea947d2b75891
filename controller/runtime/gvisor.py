"""gVisor for sandboxes that ask for it: runsc behind a second podman service.

runsc runs rootless under podman with cgroups ignored (rootless podman on cgroups v1 cannot
use them anyway), no network of its own, and `--host-uds=all` so that the host can reach the
executor's unix socket in the sandbox (without it, a socket made inside a bind-mounted
directory is invisible outside), and with the container's seccomp profile applied inside
gVisor (`--oci-seccomp`; runsc ignores it otherwise). The flags go in a
wrapper script, which the second service is told to use as its OCI runtime.
"""

import os
import shutil
from pathlib import Path

WRAPPER = """#!/bin/sh
# Written by petri's controller: runsc as the OCI runtime of its gVisor sandboxes.
# podman passes runc's --no-new-keyring when containers.conf says keyring = false (see
# scripts/bootstrap); runsc has no such flag, and no host keyrings to keep apart.
for arg do
  shift
  [ "$arg" = "--no-new-keyring" ] || set -- "$@" "$arg"
done
exec {runsc} --ignore-cgroups --network=none --host-uds=all --oci-seccomp "$@"
"""
# What user code may ask of gVisor's kernel (runsc applies it with --oci-seccomp): no new
# namespaces, no unusual socket families; scripts/seccomp-profiles writes it.
SECCOMP_PROFILE = Path(__file__).parent / "seccomp-gvisor.json"


def runsc_wrapper(runsc_binary: str, directory: Path) -> Path | None:
    """Writes the wrapper when runsc is installed; None when it is not."""
    runsc = shutil.which(runsc_binary)
    if runsc is None:
        return None
    path = directory / "runsc-petri"
    path.write_text(WRAPPER.format(runsc=runsc))
    os.chmod(path, 0o755)
    return path
