"""Print ``docker build`` arguments that give pip inside the build this host's pip settings.

Behind a TLS-inspecting proxy, or with a local wheel folder or index (as on ChatLoop's CI machines), pip in
the image cannot reach what pip here reaches. This reads pip's configuration here (``pip config list`` and the
``PIP_*`` variables) and turns it into the Dockerfile's build arguments, mounting local folders and the CA
bundle read-only into the build::

    BUILD_ARGS="$(python launch/pip_build_args.py)" launch/docker-run.sh build

Only the build sees them: nothing is copied into the image.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

CA_IN_BUILD = "/etc/ssl/host-ca.crt"


def pip_settings() -> dict[str, str]:
    """pip's effective settings here: {"index-url": ..., "extra-index-url": ..., "find-links": ..., "cert": ...}."""
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    found: dict[str, str] = {}
    for line in listed.splitlines():  # e.g. global.find-links='/opt/wheels' (later scopes win)
        key, _, value = line.partition("=")
        found[key.split(".", 1)[-1]] = value.strip().strip("'\"")
    for name in ("index-url", "extra-index-url", "find-links", "cert"):
        env = os.environ.get("PIP_" + name.upper().replace("-", "_"))
        if env:
            found[name] = env
    return found


def build_args(settings: dict[str, str]) -> list[str]:
    """The build arguments for ``settings``: local paths are mounted at the same place inside the build."""
    args = ["--network", "host"]
    mounted: set[str] = set()

    def mount(location: str, index: bool) -> None:
        path = Path(location.removeprefix("file://"))
        if not path.is_absolute() or not path.exists():
            return  # a URL: reached through the host's network
        if index and path.name == "simple":
            path = path.parent  # a local index's pages link to files beside simple/
        if str(path) not in mounted:
            mounted.add(str(path))
            args.extend(["-v", f"{path}:{path}:ro"])

    for name, arg in (("index-url", "PIP_INDEX_URL"), ("extra-index-url", "PIP_EXTRA_INDEX_URL"),
                      ("find-links", "PIP_FIND_LINKS")):
        if settings.get(name):
            for location in settings[name].split():
                mount(location, index=name != "find-links")
            args.extend(["--build-arg", f"{arg}={settings[name]}"])
    if settings.get("cert") and Path(settings["cert"]).is_file():
        args.extend(["-v", f"{Path(settings['cert']).resolve()}:{CA_IN_BUILD}:ro",
                     "--build-arg", f"REQUESTS_CA_BUNDLE={CA_IN_BUILD}"])
    return args


if __name__ == "__main__":
    print(shlex.join(build_args(pip_settings())))
