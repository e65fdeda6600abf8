"""Teacher and student: the design's layer sizes, any input shape, the student compact."""

import pytest
import torch

from common.models import build_student, build_teacher, model_size


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_both_models_map_a_batch_to_class_logits(shape):
    x = torch.randn(5, *shape)
    for build in (build_teacher, build_student):
        assert build(shape, 10)(x).shape == (5, 10)


def test_cifar_shaped_models_have_the_design_layers():
    teacher = build_teacher((3, 32, 32), 10)
    convs = [m for m in teacher.modules() if isinstance(m, torch.nn.Conv2d)]
    fcs = [m for m in teacher.modules() if isinstance(m, torch.nn.Linear)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (3, 64, (3, 3), (1, 1)), (64, 128, (3, 3), (1, 1))
    ]
    assert [(f.in_features, f.out_features) for f in fcs] == [(128 * 8 * 8, 512), (512, 10)]
    student_fcs = [m for m in build_student((3, 32, 32), 10).modules() if isinstance(m, torch.nn.Linear)]
    assert [(f.in_features, f.out_features) for f in student_fcs] == [(64 * 8 * 8, 128), (128, 10)]


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32)])
def test_student_has_at_most_a_quarter_of_the_teachers_parameters(shape):
    teacher, student = model_size(build_teacher(shape, 10)), model_size(build_student(shape, 10))
    assert student.parameters <= teacher.parameters / 4
    assert student.megabytes == pytest.approx(student.parameters * 4 / 1e6)


def test_the_tiny_family_is_sized_for_dp_sgd_tanh_and_13k_weights_on_28x28_digits_and_opacus_can_train_it():
    from common.models import build_model

    tiny = build_model("tiny", (1, 28, 28), 10)
    assert model_size(tiny).parameters == 13_242
    assert tiny(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    activations = [type(m) for m in tiny.modules() if isinstance(m, (torch.nn.Tanh, torch.nn.ReLU))]
    assert activations == [torch.nn.Tanh] * 3  # a tempered sigmoid (Papernot et al. 2021), not ReLU
    opacus = pytest.importorskip("opacus")
    assert opacus.validators.ModuleValidator.validate(tiny, strict=False) == []
