"""Prints the manifest of a sandbox image as compact JSON (build.sh writes it to
/opt/petri/manifest.json in the image and copies it into the label io.petri.manifest).

    python manifest.py PROFILE

{"profile": ..., "python": "3.13.5", "os": "Debian GNU/Linux 13 (trixie)",
 "packages": {"numpy": "2.1.3", ...}}: every distribution installed in this interpreter's
environment (what `pip list` shows), by name as its metadata spells it, sorted.
"""

import importlib.metadata
import json
import platform
import sys

os_name = ""
try:
    with open("/etc/os-release", encoding="utf-8") as release:
        for line in release:
            key, _, value = line.strip().partition("=")
            if key == "PRETTY_NAME":
                os_name = value.strip('"')
except OSError:
    pass
packages = {d.metadata["Name"]: d.version for d in importlib.metadata.distributions()}
manifest = {
    "profile": sys.argv[1],
    "python": platform.python_version(),
    "os": os_name,
    "packages": dict(sorted(packages.items(), key=lambda item: item[0].lower())),
}
print(json.dumps(manifest, separators=(",", ":")))
