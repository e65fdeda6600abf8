"""Distillation: Hinton's loss, FedDF's ensemble teacher, and a student that learns from it."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord

from common.data import server_sets
from common.models import build_teacher
from common.training import evaluate, predict_logits, train_local
from server.distillation import ServerDistillation, distillation_loss, ensemble_logits


def test_loss_is_t_squared_kl_of_softened_outputs():
    torch.manual_seed(0)
    student, teacher, t = torch.randn(6, 10), torch.randn(6, 10), 4.0
    p_teacher, p_student = F.softmax(teacher / t, 1), F.softmax(student / t, 1)
    kl = (p_teacher * (p_teacher.log() - p_student.log())).sum(1).mean()
    assert distillation_loss(student, teacher, t).item() == pytest.approx(t * t * kl.item(), rel=1e-5)


def test_loss_is_zero_when_student_equals_teacher():
    logits = torch.randn(8, 10)
    assert distillation_loss(logits, logits.clone(), 3.0).item() == pytest.approx(0.0, abs=1e-6)


def test_labels_add_weighted_cross_entropy_only_when_alpha_below_one():
    torch.manual_seed(1)
    student, teacher, labels = torch.randn(6, 10), torch.randn(6, 10), torch.randint(0, 10, (6,))
    soft = distillation_loss(student, teacher, 2.0)
    mixed = distillation_loss(student, teacher, 2.0, alpha=0.3, labels=labels)
    assert mixed.item() == pytest.approx(0.3 * soft.item() + 0.7 * F.cross_entropy(student, labels).item(), rel=1e-5)
    assert distillation_loss(student, teacher, 2.0, alpha=1.0, labels=labels).item() == pytest.approx(soft.item())


class FixedLogits(torch.nn.Module):
    """A 'client model' whose logits are given by hand."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits[: len(x)]


def test_ensemble_teacher_is_the_mean_of_client_probabilities_at_the_temperature():
    a = torch.tensor([[1.0, 0.0, -1.0], [2.0, 2.0, 0.0]])
    b = torch.tensor([[3.0, 0.0, 1.0], [0.0, -2.0, 4.0]])
    teacher = ensemble_logits([FixedLogits(a), FixedLogits(b)], torch.zeros(2, 1), torch.device("cpu"), temperature=2.0)
    expected = (F.softmax(a / 2, 1) + F.softmax(b / 2, 1)) / 2
    assert torch.allclose(F.softmax(teacher / 2, 1), expected, atol=1e-6)


def test_an_overconfident_one_class_client_does_not_decide_the_soft_targets():
    # Nine clients agree on the true class 0 with modest logits; one that saw only
    # class 2 says "2" for every input, 60x louder. Averaged logits follow it.
    calm = torch.tensor([[2.0, 0.0, 0.0]] * 4)
    loud = torch.tensor([[0.0, 0.0, 120.0]] * 4)
    clients = [FixedLogits(calm) for _ in range(9)] + [FixedLogits(loud)]
    averaged_logits = (9 * calm + loud) / 10
    assert averaged_logits.argmax(1).tolist() == [2, 2, 2, 2]
    teacher = ensemble_logits(clients, torch.zeros(4, 1), torch.device("cpu"), temperature=3.0)
    assert teacher.argmax(1).tolist() == [0, 0, 0, 0]
    loud_share = 0.1 + 0.9 * F.softmax(calm / 3, 1)[:, 2]  # it moves class 2's probability by at most 1/10
    assert torch.allclose(F.softmax(teacher / 3, 1)[:, 2], loud_share, atol=1e-6)


def test_the_anchor_mixes_the_averaged_model_into_the_teacher_by_its_weight():
    clients = torch.tensor([[0.0, 3.0]]), torch.tensor([[0.0, 1.0]])
    averaged = torch.tensor([[2.0, 0.0]])
    teacher = ensemble_logits([FixedLogits(c) for c in clients], torch.zeros(1, 1), torch.device("cpu"),
                              temperature=1.0, anchor=FixedLogits(averaged), anchor_weight=0.25)
    expected = 0.25 * F.softmax(averaged, 1) + 0.75 * (F.softmax(clients[0], 1) + F.softmax(clients[1], 1)) / 2
    assert torch.allclose(F.softmax(teacher, 1), expected, atol=1e-6)
    with pytest.raises(ValueError, match="anchor_weight"):
        ensemble_logits([FixedLogits(averaged)], torch.zeros(1, 1), torch.device("cpu"), anchor_weight=0.5)


@pytest.fixture
def small_run(config):
    config = dataclasses.replace(config, distill_steps=60)
    proxy, test = server_sets(config)
    torch.manual_seed(0)
    teacher = build_teacher(proxy.input_shape, proxy.num_classes)
    return config, proxy, test, ArrayRecord(teacher.state_dict()), teacher


def test_with_one_client_ensemble_and_global_teachers_agree(small_run):
    config, proxy, _, arrays, _ = small_run
    by_mode = {
        mode: ServerDistillation(dataclasses.replace(config, distill=mode), proxy, torch.device("cpu"))
        .teacher_logits("large", arrays, [("large", arrays)], proxy.images)
        for mode in ("global", "ensemble")
    }
    t = config.distill_temperature
    assert torch.allclose(F.softmax(by_mode["global"] / t, 1), F.softmax(by_mode["ensemble"] / t, 1), atol=1e-6)


def test_a_distillation_round_moves_the_student_toward_the_teacher(small_run):
    config, proxy, test, arrays, teacher = small_run
    distillation = ServerDistillation(config, proxy, torch.device("cpu"))
    target = predict_logits(teacher, test.images, torch.device("cpu"))

    def gap():
        return distillation_loss(predict_logits(distillation.student, test.images, torch.device("cpu")), target, 3.0).item()

    before = gap()
    returned, stats = distillation.run({"large": arrays}, [("large", arrays)])
    assert gap() < 0.5 * before  # on images it never trained on
    assert stats["student"]["steps"] == 60 and stats["seconds"] > 0
    assert returned["large"] is arrays  # target 'student' leaves the global model alone


def _trained_client(proxy, test):
    model = build_teacher(proxy.input_shape, proxy.num_classes)
    train_local(model, test, epochs=3, batch_size=16, lr=0.05, device=torch.device("cpu"), seed=0)
    return ArrayRecord(model.state_dict())


def _weights_changed(returned: ArrayRecord, arrays: ArrayRecord) -> bool:
    return any(not torch.equal(torch.tensor(returned[k].numpy()), torch.tensor(arrays[k].numpy()))
               for k in arrays.keys())


def test_target_global_fine_tunes_the_aggregated_model_toward_a_better_ensemble(small_run):
    # an untrained averaged model, one client that has learnt the task: fusion moves the
    # averaged model toward what the ensemble says on held-out proxy images, so it is kept
    config, proxy, test, arrays, _ = small_run
    config = dataclasses.replace(config, distill="ensemble", distill_target="global")
    distillation = ServerDistillation(config, proxy, torch.device("cpu"))
    assert len(distillation.validation) == int(0.2 * len(proxy))  # held out although the proxy set is unlabelled
    returned, stats = distillation.run({"large": arrays}, [("large", arrays), ("large", _trained_client(proxy, test))])
    assert distillation.student is None and "student" not in stats
    assert stats["global"]["kept-step"] > 0 and _weights_changed(returned["large"], arrays)


def test_fusion_that_does_not_agree_more_with_the_teacher_returns_the_averaged_model_unchanged(small_run):
    # the label-free guard: the teacher's top-1 on held-out proxy images labels the
    # validation slice; a teacher equal to the averaged model leaves nothing to gain
    config, proxy, _, arrays, teacher = small_run
    config = dataclasses.replace(config, distill="ensemble", distill_target="global", distill_steps=100)
    distillation = ServerDistillation(config, proxy, torch.device("cpu"))
    distillation.teacher_logits = lambda _f, _a, _c, images, _m: predict_logits(teacher, images, torch.device("cpu"))
    returned, stats = distillation.run({"large": arrays}, [("large", arrays)])
    assert stats["global"]["kept-step"] == 0 and stats["global"]["validation-accuracy"] == 1.0
    assert not _weights_changed(returned["large"], arrays)


def test_a_student_only_run_on_an_unlabelled_proxy_set_trains_on_all_of_it(config):
    proxy, _ = server_sets(config)
    distillation = ServerDistillation(dataclasses.replace(config, distill_target="student"), proxy,
                                      torch.device("cpu"))
    assert distillation.validation is None and len(distillation.proxy_train) == len(proxy)


def test_labelled_proxy_set_stops_early_on_its_validation_slice(small_run):
    config, proxy, _, arrays, _ = small_run
    config = dataclasses.replace(config, proxy_labelled=True, distill_alpha=0.5, distill_steps=400)
    distillation = ServerDistillation(config, proxy, torch.device("cpu"))
    assert len(distillation.validation) + len(distillation.proxy_train) == len(proxy)
    _, stats = distillation.run({"large": arrays}, [("large", arrays)])
    assert stats["student"]["steps"] < 400


def test_with_a_labelled_proxy_set_fusion_never_returns_a_model_worse_on_validation_than_it_got(small_run):
    # FedDF's fallback (the authors' return_best_model_on_val): the model as it came
    # in is a candidate, so a teacher that only misleads leaves it as it was.
    config, proxy, _, arrays, teacher = small_run
    config = dataclasses.replace(config, proxy_labelled=True, distill="ensemble", distill_target="global",
                                 distill_anchor=0.0, distill_steps=100)
    distillation = ServerDistillation(config, proxy, torch.device("cpu"))
    wrong = torch.zeros(len(distillation.proxy_train), proxy.num_classes)
    wrong[torch.arange(len(wrong)), (distillation.proxy_train.labels + 1) % proxy.num_classes] = 30.0
    distillation.teacher_logits = lambda *_: wrong  # a teacher that is always wrong
    before = evaluate(teacher, distillation.validation, torch.device("cpu"))["accuracy"]
    returned, _ = distillation.run({"large": arrays}, [("large", arrays)])
    model = build_teacher(proxy.input_shape, proxy.num_classes)
    model.load_state_dict(returned["large"].to_torch_state_dict())
    assert evaluate(model, distillation.validation, torch.device("cpu"))["accuracy"] >= before
