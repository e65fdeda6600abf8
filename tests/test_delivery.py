"""Models delivered to a node: installed atomically, checked before use, measured there, listed by the server."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from PIL import Image

from client.client_app import receive_models
from client.predict import main as predict
from common.config import ConfigError, RunConfig
from common.data import server_sets
from common.model_package import CURRENT, MANIFEST, PREVIOUS, ModelPackageError, describe_files, install, verify
from common.models import build_student, build_teacher
from server.delivery import MESSAGE_TYPE, build_package, delivered_models, device_row, device_table, export_files


@pytest.fixture(autouse=True)
def identity():
    """Messages can only be built inside a run, as in a ClientApp process."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 7, 1
    yield
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = None


def package(name: str) -> tuple[dict[str, bytes], dict]:
    files = {"model.bin": name.encode() * 100, "other.bin": b"x" * 10}
    return files, {"version": name, "files": describe_files(files)}


def test_an_install_replaces_the_current_model_and_keeps_the_one_before_as_previous(tmp_path):
    install(tmp_path, *package("one"))
    current = install(tmp_path, *package("two"))
    assert current == tmp_path / CURRENT
    assert verify(tmp_path / CURRENT)["version"] == "two" and verify(tmp_path / PREVIOUS)["version"] == "one"
    install(tmp_path, *package("three"))
    assert verify(tmp_path / PREVIOUS)["version"] == "two"  # one rollback step, not a history
    assert sorted(p.name for p in tmp_path.iterdir()) == [CURRENT, PREVIOUS]  # no temporary folder left


def test_a_write_that_fails_half_way_leaves_the_installed_model_intact(tmp_path):
    install(tmp_path, *package("one"))
    files, manifest = package("two")
    files["other.bin"] = b"y" * 10  # the bytes no longer match the manifest: the check after writing fails
    with pytest.raises(ModelPackageError, match=f"cannot install into {tmp_path}.*other.bin.*unchanged"):
        install(tmp_path, files, manifest)
    assert verify(tmp_path / CURRENT)["version"] == "one" and not (tmp_path / PREVIOUS).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [CURRENT]


def test_a_model_dir_that_cannot_be_created_is_named_with_the_cause(tmp_path):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ModelPackageError, match="cannot write the model folder .*a-file/models: Not a directory"):
        install(tmp_path / "a-file" / "models", *package("one"))


def test_a_swap_that_fails_puts_the_installed_model_back(tmp_path, monkeypatch):
    install(tmp_path, *package("one"))
    real_rename = Path.rename

    def rename(self, target):
        if self.name.startswith(".incoming-"):
            raise OSError(5, "Input/output error", str(self))
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(ModelPackageError, match=f"cannot install into {tmp_path}: .*Input/output error"):
        install(tmp_path, *package("two"))
    monkeypatch.undo()
    assert verify(tmp_path / CURRENT)["version"] == "one"
    assert [p.name for p in tmp_path.iterdir()] == [CURRENT]


@pytest.mark.parametrize("damage", ["one byte changed", "truncated", "removed"])
def test_a_damaged_file_is_refused_naming_it(tmp_path, damage):
    install(tmp_path, *package("one"))
    file = tmp_path / CURRENT / "model.bin"
    data = file.read_bytes()
    if damage == "one byte changed":
        file.write_bytes(data[:10] + bytes([data[10] ^ 1]) + data[11:])
    elif damage == "truncated":
        file.write_bytes(data[:-1])
    else:
        file.unlink()
    with pytest.raises(ModelPackageError, match=str(file)):
        verify(tmp_path / CURRENT)


@pytest.fixture(scope="module")
def digits():
    from tests.conftest import default_run_config

    raw = default_run_config()
    config = RunConfig.from_mapping(raw)
    proxy_set, test_set = server_sets(config)
    torch.manual_seed(0)
    return raw, config, proxy_set, test_set, build_student((1, 8, 8), 10).eval(), build_teacher((1, 8, 8), 10).eval()


def deliver_message(digits, folder, names=("student", "global")) -> tuple[Message, dict]:
    raw, config, proxy_set, test_set, student, teacher = digits
    models = {"student": student, "global": teacher}
    files = export_files({n: models[n] for n in names}, (1, 8, 8), folder, proxy_set.images)
    blobs, manifest = build_package(files, {"student": 0.5, "global": 0.6}, run_id=1, server_round=2, config=config)
    content = RecordDict({"config": ConfigRecord({"partition-id": 1, "num-partitions": 3, "server-round": 2}),
                          "files": ConfigRecord(blobs), "manifest": ConfigRecord({"json": json.dumps(manifest)})})
    return Message(content, dst_node_id=7, message_type=MESSAGE_TYPE), manifest


def node(raw, node_config) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config=raw)


def test_a_node_installs_what_it_is_sent_and_measures_every_model_there(digits, tmp_path):
    raw, _, _, test_set, student, _ = digits
    msg, manifest = deliver_message(digits, tmp_path / "server")
    reply = receive_models(msg, node(raw, {"model-dir": str(tmp_path / "models")}))
    result, metrics = dict(reply.content["result"]), dict(reply.content["metrics"])
    assert result["status"] == "installed", result["error"]
    assert result["data"] == "partition 1 of 3 (the global model trained on it)"
    installed = tmp_path / "models" / CURRENT
    assert verify(installed)["files"] == manifest["files"]
    assert set(manifest["models"]) == {"student", "student-int8", "global"}
    for name in manifest["models"]:
        assert metrics[f"{name}-latency-ms-b1"] > 0 and metrics[f"{name}-latency-ms-b32"] > 0
        assert 0 <= metrics[f"{name}-accuracy"] <= 1 and metrics[f"{name}-bytes"] > 0
    import onnxruntime as ort

    session = ort.InferenceSession(str(installed / "student.onnx"), providers=["CPUExecutionProvider"])
    images = test_set.images[:32]
    with torch.no_grad():
        expected = student(images).numpy()
    assert np.allclose(session.run(None, {session.get_inputs()[0].name: images.numpy()})[0], expected, atol=1e-5)
    row = device_row(7, (1, 3), reply, list(manifest["models"]))
    assert row["status"] == "installed" and row["models"]["student"]["runtime"] == "onnxruntime"
    assert "student" in device_table([row]) and "int8" not in str(row["models"]["student"])


def test_a_node_that_cannot_install_replies_why_and_keeps_its_model(digits, tmp_path):
    raw = digits[0]
    install(tmp_path / "models", *package("one"))
    msg, _ = deliver_message(digits, tmp_path / "server", names=("student",))
    (tmp_path / "models" / "blocker").write_text("")
    reply = receive_models(msg, node(raw, {"model-dir": str(tmp_path / "models" / "blocker" / "models")}))
    result = dict(reply.content["result"])
    assert result["status"] == "failed" and "blocker" in result["error"] and "Not a directory" in result["error"]
    assert verify(tmp_path / "models" / CURRENT)["version"] == "one"
    row = device_row(7, (1, 3), reply, ["student"])
    assert row["status"] == "failed" and "failed" in device_table([row])


def test_the_server_lists_a_silent_node_and_an_error_reply_with_their_reasons():
    assert device_row(5, (0, 3), None, ["student"])["status"] == "no answer"
    failed = Message(RecordDict({"result": ConfigRecord({"status": "x"}), "metrics": MetricRecord({})}),
                     dst_node_id=7, message_type=MESSAGE_TYPE)
    from flwr.app import Error

    error_reply = Message(Error(code=0, reason="ClientApp raised"), reply_to=failed)
    row = device_row(7, (1, 3), error_reply, ["student"])
    assert row["status"] == "error reply" and row["error"] == "ClientApp raised"


def write_images(folder):
    folder.mkdir()
    for i in range(3):
        Image.fromarray((np.random.default_rng(i).random((8, 8)) * 255).astype(np.uint8), "L").save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes((folder / "0.png").read_bytes()[:20])  # truncated


def test_predict_prints_one_line_per_readable_image_and_skips_a_broken_one_naming_it(digits, tmp_path, capsys):
    raw = digits[0]
    msg, manifest = deliver_message(digits, tmp_path / "server")
    receive_models(msg, node(raw, {"model-dir": str(tmp_path / "models")}))
    write_images(tmp_path / "images")
    done = subprocess.run([sys.executable, "-m", "client.predict", "--model-dir", str(tmp_path / "models"),
                           "--model", "student-int8", "--json", str(tmp_path / "images")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["path"].rsplit("/", 1)[1] for line in lines] == ["0.png", "1.png", "2.png"]
    assert all(line["class"] in manifest["class-names"] and 0 < line["probability"] <= 1 for line in lines)
    assert {line["runtime"] for line in lines} == {"onnxruntime"}
    assert "broken.png" in done.stderr and "not a readable image" in done.stderr


def test_predict_refuses_a_tampered_model_folder_naming_the_file(digits, tmp_path, capsys):
    raw = digits[0]
    msg, _ = deliver_message(digits, tmp_path / "server", names=("student",))
    receive_models(msg, node(raw, {"model-dir": str(tmp_path / "models")}))
    onnx = tmp_path / "models" / CURRENT / "student.onnx"
    data = bytearray(onnx.read_bytes())
    data[100] ^= 1
    onnx.write_bytes(bytes(data))
    write_images(tmp_path / "images")
    with pytest.raises(SystemExit) as exit_:
        predict(["--model-dir", str(tmp_path / "models"), str(tmp_path / "images")])
    assert exit_.value.code == 2
    assert f"{onnx} does not match its SHA-256" in capsys.readouterr().err


def test_predict_names_a_model_that_is_not_installed(digits, tmp_path, capsys):
    msg, _ = deliver_message(digits, tmp_path / "server", names=("student",))
    receive_models(msg, node(digits[0], {"model-dir": str(tmp_path / "models")}))
    with pytest.raises(SystemExit):
        predict(["--model-dir", str(tmp_path / "models"), "--model", "global", str(tmp_path)])
    assert "'global' is not installed" in capsys.readouterr().err and MANIFEST


def test_without_onnxruntime_a_node_serves_torchscript_and_says_why_the_int8_student_did_not_run(
        digits, tmp_path, monkeypatch, capsys):
    import client.inference

    raw, _, _, test_set, student, _ = digits
    msg, _ = deliver_message(digits, tmp_path / "server", names=("student",))
    monkeypatch.setattr(client.inference, "onnxruntime_available", lambda: False)
    reply = receive_models(msg, node(raw, {"model-dir": str(tmp_path / "models")}))
    result, metrics = dict(reply.content["result"]), dict(reply.content["metrics"])
    runtimes = json.loads(result["runtimes"])
    assert result["status"] == "installed" and runtimes["student"] == "torchscript"
    assert runtimes["student-int8"].startswith("not run: ") and "install onnxruntime" in runtimes["student-int8"]
    assert 0 <= metrics["student-accuracy"] <= 1 and "student-int8-accuracy" not in metrics
    module = torch.jit.load(str(tmp_path / "models" / CURRENT / "student.pt"))
    images = test_set.images[:32]
    with torch.no_grad():
        assert torch.allclose(module(images), student(images), atol=1e-5)
    write_images(tmp_path / "images")
    assert predict(["--model-dir", str(tmp_path / "models"), "--json", str(tmp_path / "images" / "0.png")]) == 0
    assert json.loads(capsys.readouterr().out)["runtime"] == "torchscript"
    with pytest.raises(SystemExit):
        predict(["--model-dir", str(tmp_path / "models"), "--model", "student-int8", str(tmp_path / "images")])
    assert "install onnxruntime to run it" in capsys.readouterr().err


def test_a_bad_model_dir_is_refused_naming_the_value(digits, tmp_path):
    msg, _ = deliver_message(digits, tmp_path / "server", names=("student",))
    (tmp_path / "a-file").write_text("")
    for value in ("", str(tmp_path / "a-file"), 3):
        with pytest.raises(ConfigError, match=f"node config 'model-dir' = {value!r} is not allowed"):
            receive_models(msg, node(digits[0], {"model-dir": value}))


def test_deliver_auto_is_the_student_when_one_trains_else_the_global_model(config):
    from dataclasses import replace

    assert delivered_models(config, has_student=True) == ("student",)
    assert delivered_models(replace(config, distill="off"), has_student=False) == ("global",)
    assert delivered_models(replace(config, deliver="both"), has_student=True) == ("student", "global")
    assert delivered_models(replace(config, deliver="none"), has_student=True) == ()


@pytest.mark.parametrize("overrides, message", [
    ({"deliver": "phone"}, "'deliver' = 'phone' is not allowed; use one of 'auto', 'student', 'global', 'both'"),
    ({"deliver-every": -1}, "'deliver-every' = -1 is not allowed; use a number >= 0"),
    ({"deliver": "student", "distill": "off"}, "'deliver' = 'student' needs a student"),
    ({"deliver": "both", "distill": "ensemble", "distill-target": "global"}, "'deliver' = 'both' needs a student"),
])
def test_bad_delivery_settings_are_refused_at_start(raw_config, overrides, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_mapping({**raw_config, **overrides})
