"""``fl-distill-predict``: classify images with the model installed in a node's model folder.

    fl-distill-predict --model-dir DIR [--model student|student-int8|global] [--json] PATH...

Checks every file of the installed folder against its manifest's SHA-256 first
and refuses a folder that does not match (tampered, truncated, mid-update),
naming the file. Images are read and preprocessed exactly as a client's
``data-dir`` loader does (``common/image_folder.py``); a folder argument
predicts every image in it, and an unreadable image is skipped with a warning
naming it. Runs the model with onnxruntime when installed, else TorchScript.
Exit status: 0, or 2 for a bad model folder, model name or path.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from client.inference import NoRuntimeError, runner
from common.image_folder import image_files, read_image
from common.model_package import ModelPackageError, installed, verify


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fl-distill-predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True, help="the node's model-dir (or a folder holding manifest.json)")
    parser.add_argument("--model", default="", help="student, student-int8 or global (default: the first delivered)")
    parser.add_argument("--json", action="store_true", help="one JSON object per image instead of text")
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders of images")
    args = parser.parse_args(argv)
    try:
        folder = installed(Path(args.model_dir))
        manifest = verify(folder)
    except ModelPackageError as err:
        parser.error(f"refusing the model folder: {err}")
    models = manifest["models"]
    name = args.model or next(iter(models))
    if name not in models:
        parser.error(f"--model = {name!r} is not installed in {folder}; installed: {', '.join(models)}")
    try:
        model = runner(folder, name, models[name]["files"])
    except NoRuntimeError as err:
        parser.error(str(err))
    missing = [p for p in args.paths if not Path(p).exists()]
    if missing:
        parser.error(f"no such file or folder: {', '.join(missing)}")
    channels, height, width = manifest["input-shape"]
    class_names = manifest["class-names"]
    for path in image_files([Path(p) for p in args.paths]):
        pixels = read_image(path, channels, (height, width))
        if pixels is None:
            continue  # read_image warned, naming the file
        probabilities = softmax(model.predict(pixels.numpy()[None]))[0]
        best = int(probabilities.argmax())
        if args.json:
            print(json.dumps({"path": str(path), "class": class_names[best], "index": best,
                              "probability": float(probabilities[best]), "model": name, "runtime": model.runtime}))
        else:
            print(f"{path}: {class_names[best]} ({probabilities[best]:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
