#!/usr/bin/env python3
"""Print the app's runtime requirements, one per line, for the container images.

Reads ``[project].dependencies``, the ``dp`` extra (``dp = "central"`` needs
the accountant in the ServerApp) and the ``onnx`` extra (the ServerApp exports
and quantizes the student; clients run what is delivered to them with
onnxruntime) from the app's pyproject.toml (the single
source of truth) and drops the ``simulation`` extra of flwr: SuperLink/SuperNode
containers run the deployment runtime and do not need Ray.

    python3 docker/image-requirements.py pyproject.toml > requirements.txt
"""

import re
import sys
import tomllib


def main(path: str) -> None:
    with open(path, "rb") as f:
        project = tomllib.load(f)["project"]
    extras = project.get("optional-dependencies", {})
    deps = project["dependencies"] + extras.get("dp", []) + extras.get("onnx", [])
    for dep in deps:
        # "flwr[simulation]>=1.39,<1.40" -> "flwr>=1.39,<1.40"
        m = re.match(r"^\s*(flwr)\s*\[([^\]]*)\](.*)$", dep)
        if m:
            extras = [e.strip() for e in m.group(2).split(",") if e.strip() != "simulation"]
            dep = m.group(1) + (f"[{','.join(extras)}]" if extras else "") + m.group(3)
        print(dep.strip())


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml")
