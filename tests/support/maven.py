"""A Maven repository on disk, in the layout Maven reads (for the client tests)."""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path


def maven_artifact(root: Path, group: str, name: str, version: str) -> None:
    """A jar (a manifest only) and its POM under C{root} in the Maven layout, with C{.sha1} files."""
    jar = io.BytesIO()
    with zipfile.ZipFile(jar, "w") as z:
        z.writestr("META-INF/MANIFEST.MF", "Manifest-Version: 1.0\n")
    folder = root / group.replace(".", "/") / name / version
    folder.mkdir(parents=True)
    pom = ('<project xmlns="http://maven.apache.org/POM/4.0.0"><modelVersion>4.0.0</modelVersion>'
           f"<groupId>{group}</groupId><artifactId>{name}</artifactId>"
           f"<version>{version}</version><packaging>jar</packaging></project>\n").encode()
    for file, data in ((f"{name}-{version}.pom", pom), (f"{name}-{version}.jar", jar.getvalue())):
        (folder / file).write_bytes(data)
        (folder / (file + ".sha1")).write_text(hashlib.sha1(data).hexdigest())
