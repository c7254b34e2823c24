"""Every loss and metric formula against values worked out by hand."""

import math

import numpy as np
import pytest
import torch

from engines.models.student import VA_BIN_CENTRES, va_expectation
from training import losses, metrics
from training.labels import MISSING


def test_macro_f1_averages_over_the_classes_present():
    # scikit-learn's f1_score(average="macro"), the ABAW2/authors' evaluation: classes 3..6 neither
    # occur nor are predicted, so they are left out. Per class F1: 0 -> 2*1/(2+1) = 2/3,
    # 1 -> 2*1/(1+2) = 2/3, 2 -> 1. (Averaging over all 7 would give 7/3/7 = 1/3.)
    pred, target = np.array([0, 0, 1, 2]), np.array([0, 1, 1, 2])
    assert metrics.macro_f1(pred, target) == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)


def test_macro_f1_counts_a_class_only_predicted_and_ignores_no_prediction():
    # A subset like one clip: true classes {4, 5}; 6 is only predicted (F1 0, still a class);
    # -1 (evaluate.NO_EXPR, a frame without a face) is an error for class 5 but not a class.
    # Class 4: tp 2, |pred 4| 2, |true 4| 3 -> 4/5. Class 5: tp 1, |pred 5| 1, |true 5| 3 -> 2/4.
    # Class 6: tp 0 -> 0. Mean over {4, 5, 6} = (0.8 + 0.5 + 0) / 3.
    pred = np.array([4, 4, 6, 5, 6, -1])
    target = np.array([4, 4, 4, 5, 5, 5])
    assert metrics.macro_f1(pred, target) == pytest.approx(1.3 / 3)
    assert metrics.macro_f1(np.array([], int), np.array([], int)) == 0.0


def test_expr_score_is_067_f1_plus_033_accuracy():
    pred, target = np.array([0, 0, 1, 2]), np.array([0, 1, 1, 2])
    assert metrics.expr_score(pred, target) == pytest.approx(0.67 * (7 / 9) + 0.33 * 0.75)


@pytest.mark.parametrize(("y", "expected"), [
    ([-1.0, 0.0, 1.0], 1.0),  # perfect
    ([1.0, 0.0, -1.0], -1.0),  # negated
    ([0.0, 1.0, 2.0], 4 / 7),  # shifted by 1: 2*(2/3) / (2/3 + 2/3 + 1); sample stats would give 2/3
])
def test_ccc_uses_population_statistics(y, expected):
    x = np.array([-1.0, 0.0, 1.0])
    assert metrics.ccc(x, np.array(y)) == pytest.approx(expected)
    assert float(losses.ccc(torch.tensor(x), torch.tensor(y))) == pytest.approx(expected)


def test_abaw_selection_is_expr_score_plus_both_cccs():
    va = np.array([[-1.0, -1.0], [0.0, 0.0], [1.0, 1.0]])
    result = metrics.abaw_metrics(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 2]), va, va[:, ::-1] * [1, -1])
    assert result["ccc_valence"] == pytest.approx(1.0)
    assert result["ccc_arousal"] == pytest.approx(-1.0)
    assert result["selection"] == pytest.approx(result["expr_score"])


def test_expr_ce_masks_sentinel_rows():
    logits = torch.zeros(3, 7)
    logits[1] = torch.tensor([50.0, 0, 0, 0, 0, 0, 0])  # would dominate the mean if not masked
    target = torch.tensor([0, MISSING, 3])
    assert float(losses.expr_ce(logits, target)) == pytest.approx(math.log(7))


def test_va_digitisation_and_bin_centres():
    values = torch.tensor([-1.0, -0.95, 0.0, 0.05, 0.999, 1.0])
    assert losses.digitize_va(values, 20).tolist() == [0, 0, 10, 10, 19, 19]
    assert VA_BIN_CENTRES[0] == pytest.approx(-0.95) and VA_BIN_CENTRES[-1] == pytest.approx(0.95)
    logits = torch.zeros(2, 2, 20)
    logits[1, :, 3] = 100.0  # all mass on bin 3, centre -0.65
    assert va_expectation(logits).flatten().tolist() == pytest.approx([0.0, 0.0, -0.65, -0.65], abs=1e-6)


def test_va_loss_is_ce_plus_one_minus_ccc_per_dimension():
    target = torch.tensor([[-0.65, 0.05], [0.25, -0.35], [0.85, 0.55], [MISSING, MISSING]])
    uniform = torch.zeros(4, 2, 20)
    uniform[3] = torch.randn(2, 20) * 10  # the unlabelled row must not count
    # Uniform bins: CE = log 20, expectation 0 everywhere so CCC = 0; two dimensions summed.
    assert float(losses.va_gt_loss(uniform, target)) == pytest.approx(2 * (math.log(20) + 1), rel=1e-5)
    peaked = torch.full((4, 2, 20), -100.0)
    peaked.scatter_(2, losses.digitize_va(target.clamp(-1, 1), 20).unsqueeze(-1), 100.0)
    # All mass on the target's bin, whose centre is the target: CE = 0 and CCC = 1.
    assert float(losses.va_gt_loss(peaked, target)) == pytest.approx(0.0, abs=1e-4)


def test_distillation_is_t2_kl_at_t_1_5():
    teacher = torch.tensor([[1.5 * math.log(3.0), 0.0]])  # softmax(teacher / 1.5) = (3/4, 1/4)
    student = torch.zeros(1, 2)  # (1/2, 1/2)
    expected = 1.5**2 * (0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    assert float(losses.distillation(student, teacher, 1.5)[0]) == pytest.approx(expected)
    assert float(losses.distillation(teacher, teacher, 1.5)[0]) == pytest.approx(0.0, abs=1e-7)


def test_va_distillation_sums_the_two_bin_distributions():
    student, teacher = torch.randn(3, 2, 20), torch.randn(3, 2, 20)
    per_dim = [losses.distillation(student[:, d], teacher[:, d], 1.5) for d in range(2)]
    assert torch.allclose(losses.distillation(student, teacher, 1.5), per_dim[0] + per_dim[1])


def test_student_mix_weights():
    kd = torch.tensor([1.0, 3.0])
    everything, nothing, half = torch.tensor([True, True]), torch.tensor([False, False]), torch.tensor([True, False])
    # Fully labelled: 0.6 * GT + 0.4 * mean KD.
    assert float(losses.student_mix(torch.tensor(2.0), kd, everything, 0.6)) == pytest.approx(0.6 * 2 + 0.4 * 2)
    # Unlabelled: KD alone at weight 1.
    assert float(losses.student_mix(None, kd, nothing, 0.6)) == pytest.approx(2.0)
    # Per frame: (0.4 * 1 + 1 * 3) / 2 + (1/2) * 0.6 * 2.
    assert float(losses.student_mix(torch.tensor(2.0), kd, half, 0.6)) == pytest.approx(1.7 + 0.6)


def test_task_total_means_over_streams_per_task():
    total = losses.task_total([torch.tensor(1.0), torch.tensor(3.0)], [torch.tensor(2.0)])
    assert float(total) == pytest.approx(2.0 + 2.0)
    assert float(losses.task_total([torch.tensor(1.0)], [])) == pytest.approx(1.0)
