"""How close a student's sentence embeddings are to a teacher's: the measures of dense-to-FFF
conversion, all on held-out text and L2-normalised embeddings.

- :func:`mean_cosine`: the cosine of each sentence's two embeddings, averaged.
- :func:`similarity_spearman`: Spearman correlation between the two models' pairwise similarities
  (every pair of the sentences): whether the student ranks pairs as the teacher does, which is what
  retrieval and semantic-similarity uses of an encoder rely on.
- :func:`neighbour_agreement`: the share of each sentence's k nearest neighbours under the teacher
  that are also among its k nearest under the student.
- :func:`probe_accuracy`: test accuracy of a logistic-regression probe on frozen embeddings.
"""

import numpy as np
from jaxtyping import Float, Int


def _normalised(e: Float[np.ndarray, "n dim"], name: str) -> np.ndarray:
    e = np.asarray(e, dtype=np.float64)
    if e.ndim != 2 or len(e) < 2:
        raise ValueError(f"{name}: expected (n, dim) embeddings with n >= 2, got shape {e.shape}")
    return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)


def _pair(student, teacher) -> tuple[np.ndarray, np.ndarray]:
    s, t = _normalised(student, "student"), _normalised(teacher, "teacher")
    if len(s) != len(t):
        raise ValueError(f"student, teacher: expected the same sentences, got {len(s)} and {len(t)} rows")
    return s, t


def mean_cosine(student: Float[np.ndarray, "n dim_s"], teacher: Float[np.ndarray, "n dim_t"]) -> float:
    """Mean over sentences of cos(student_i, teacher_i); needs the same embedding width."""
    s, t = _pair(student, teacher)
    if s.shape[1] != t.shape[1]:
        raise ValueError(f"student, teacher: expected the same width, got {s.shape[1]} and {t.shape[1]}")
    return float(np.mean(np.sum(s * t, axis=1)))


def similarity_spearman(student: Float[np.ndarray, "n dim_s"], teacher: Float[np.ndarray, "n dim_t"]) -> float:
    """Spearman correlation of the n(n-1)/2 pairwise cosine similarities of the two models."""
    from scipy.stats import spearmanr

    s, t = _pair(student, teacher)
    upper = np.triu_indices(len(s), k=1)
    return float(spearmanr((s @ s.T)[upper], (t @ t.T)[upper]).statistic)


def _neighbours(e: np.ndarray, k: int) -> np.ndarray:
    sims = e @ e.T
    np.fill_diagonal(sims, -np.inf)
    return np.argpartition(-sims, k - 1, axis=1)[:, :k] if k > 1 else np.argmax(sims, axis=1)[:, None]


def neighbour_agreement(student: Float[np.ndarray, "n dim_s"], teacher: Float[np.ndarray, "n dim_t"],
                        k: int) -> float:
    """Mean over sentences of |teacher's k nearest ∩ student's k nearest| / k (the sentence itself
    excluded); at k = 1, the share of sentences whose nearest neighbour is the same."""
    s, t = _pair(student, teacher)
    if not 1 <= k < len(s):
        raise ValueError(f"k: expected 1 <= k < n = {len(s)}, got {k}")
    ns, nt = _neighbours(s, k), _neighbours(t, k)
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ns, nt)]))


def probe_accuracy(train_embeddings: Float[np.ndarray, "n_train dim"], train_labels: Int[np.ndarray, " n_train"],
                   test_embeddings: Float[np.ndarray, "n_test dim"], test_labels: Int[np.ndarray, " n_test"],
                   *, c: float = 1.0) -> float:
    """Test accuracy of an L2-regularised logistic regression (inverse strength ``c``) fitted on the
    frozen training embeddings: how much of the label the embeddings carry linearly."""
    from sklearn.linear_model import LogisticRegression

    if len(train_embeddings) != len(train_labels) or len(test_embeddings) != len(test_labels):
        raise ValueError("train_labels, test_labels: expected one label per embedding row")
    probe = LogisticRegression(C=c, max_iter=2000).fit(np.asarray(train_embeddings), np.asarray(train_labels))
    return float(probe.score(np.asarray(test_embeddings), np.asarray(test_labels)))
