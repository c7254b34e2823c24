"""The KD term must matter: on labels that are wrong where the teacher is right (and the reverse),
the paper's student (0.6 GT + 0.4 x T^2 x KL, T = 1.5) beats students whose KD term is off, left
without its T^2 factor, or over-weighted. Design and reasoning: ``training/synthetic_kd.py``.

Measured (EXPR score on clean held-out data, seeds 0-4, 2-core CPU): paper 0.978-0.990; KD x 0
0.828-0.835 (margin 0.143-0.162); T^2 left out 0.893-0.909 (margin 0.074-0.092); alpha swapped
to 0.4 0.885-0.927 (margin 0.052-0.101); the teacher alone 0.825. The required margins below sit
at about half of the smallest measured one. The outcome is smooth in the loss's balance (a convex
student, fresh samples every step), so platform arithmetic moves it by far less than that.
"""

from dataclasses import replace

import pytest

from training import loops, losses
from training.synthetic_kd import KD_CONFIG, make_task, run_kd_benchmark, train_and_score

SEEDS = (0, 1, 2)
MARGIN = {"no_kd": 0.07, "no_t2": 0.04, "kd_heavy": 0.025}


def _without_t2(student_logits, teacher_logits, temperature):
    """The classic slip: the KL of the softened distributions without the T^2 rescaling."""
    return losses.distillation(student_logits, teacher_logits, temperature) / temperature**2


@pytest.mark.parametrize("seed", SEEDS)
def test_paper_mix_beats_broken_distillation(seed, monkeypatch):
    results = run_kd_benchmark(seed)  # teacher, paper, no_kd (alpha = 1), kd_heavy (alpha = 0.4)
    task = make_task(seed)
    with monkeypatch.context() as patch:
        patch.setattr(loops, "distillation", _without_t2)
        results["no_t2"] = train_and_score(task, KD_CONFIG, task.teacher, seed)
    paper = results["paper"]["expr_score"]
    report = {name: round(metrics["expr_score"], 3) for name, metrics in results.items()}
    for variant, margin in MARGIN.items():
        assert paper - results[variant]["expr_score"] >= margin, (variant, report)
    # The student surpasses its teacher, as in the paper: the labels fix the teacher's disgust error.
    assert paper - results["teacher"]["expr_score"] >= 0.1, report
    # And for the reason designed: the teacher wins fear back, the labels keep disgust.
    assert results["paper"]["recall_fear"] > 0.7 and results["paper"]["recall_disgust"] > 0.9, results["paper"]
    assert results["no_kd"]["recall_fear"] < 0.2 and results["kd_heavy"]["recall_disgust"] < 0.7, report


def test_teacher_none_equals_kd_times_zero():
    """Ground truth alone is exactly the paper's loop with alpha = 1 on fully labelled frames."""
    task = make_task(0)
    alone = train_and_score(task, replace(KD_CONFIG, steps_per_epoch=50), None, 0)
    zero_kd = train_and_score(task, replace(KD_CONFIG, steps_per_epoch=50, alpha=1.0), task.teacher, 0)
    assert alone["expr_score"] == pytest.approx(zero_kd["expr_score"])
