import numpy as np
import pytest

from fffjax import similarity


def _embeddings(seed: int, n: int = 60, dim: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim))


def test_identical_embeddings_score_one():
    e = _embeddings(0)
    assert similarity.mean_cosine(e, 3.0 * e) == pytest.approx(1.0)
    assert similarity.similarity_spearman(e, e) == pytest.approx(1.0)
    assert similarity.neighbour_agreement(e, e, 1) == 1.0
    assert similarity.neighbour_agreement(e, e, 10) == 1.0


def test_rotation_keeps_similarities_but_not_cosine():
    e = _embeddings(1)
    rotation, _ = np.linalg.qr(np.random.default_rng(2).normal(size=(16, 16)))
    rotated = e @ rotation
    assert similarity.similarity_spearman(rotated, e) == pytest.approx(1.0)
    assert similarity.neighbour_agreement(rotated, e, 5) == 1.0
    assert similarity.mean_cosine(rotated, e) < 0.5


def test_noise_lowers_every_measure_in_order():
    e = _embeddings(3)
    noise = np.random.default_rng(4).normal(size=e.shape)
    scores = [similarity.similarity_spearman(e + a * noise, e) for a in (0.1, 0.5, 2.0)]
    assert 1.0 > scores[0] > scores[1] > scores[2]
    assert similarity.neighbour_agreement(_embeddings(5), e, 10) < 0.5


def test_neighbour_agreement_counts_shared_neighbours():
    teacher = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    student = np.array([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9]])  # rows 1 and 2 swapped
    assert similarity.neighbour_agreement(student, teacher, 1) == 0.0


def test_probe_separates_a_linear_label():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(400, 8))
    y = (x[:, 0] > 0).astype(np.int32)
    assert similarity.probe_accuracy(x[:300], y[:300], x[300:], y[300:]) > 0.9
    assert similarity.probe_accuracy(x[:300, 1:], y[:300], x[300:, 1:], y[300:]) < 0.7


def test_errors_name_the_argument():
    with pytest.raises((ValueError, TypeError), match="student"):  # jaxtyping's check names the argument
        similarity.mean_cosine(_embeddings(0, n=5), _embeddings(0, n=6))
    with pytest.raises(ValueError, match="k:"):
        similarity.neighbour_agreement(_embeddings(0, n=5), _embeddings(0, n=5), 5)
    with pytest.raises((ValueError, TypeError), match="student"):
        similarity.similarity_spearman(np.ones(3), np.ones((3, 2)))
