"""The synthetic multi-database benchmark: the teacher learns, the student keeps up.

Measured with ``BENCHMARK_CONFIG`` (seed 0, 2 CPU cores, 300 clean held-out frames, ~15 s):
teacher EXPR score 0.964, CCC valence 0.967, arousal 0.875 (selection 2.806); student 0.969,
0.980, 0.891 (selection 2.839). Chance is an EXPR score near 0.2 and CCCs near 0.
"""

import pytest

from training.synthetic import run_benchmark

# Thresholds sit 0.15-0.17 under the measured teacher: margin for thread-count and platform
# differences in CPU arithmetic, still far above chance.
TEACHER_MIN = {"expr_score": 0.8, "ccc_valence": 0.8, "ccc_arousal": 0.7}
# The student sees the same data plus soft labels and measured +0.033 over the teacher; 0.05 of the
# 3-point selection score (under 2 %) allows numeric drift. This task saturates, so it checks the
# pipeline end to end, not distillation: test_distillation.py fails a broken KD term.
STUDENT_TOLERANCE = 0.05


@pytest.mark.slow
def test_teacher_learns_and_student_keeps_up(tmp_path):
    results = run_benchmark(tmp_path)
    teacher, student = results["teacher"], results["student"]
    for key, minimum in TEACHER_MIN.items():
        assert teacher[key] > minimum, (key, teacher)
    assert student["selection"] >= teacher["selection"] - STUDENT_TOLERANCE, results
