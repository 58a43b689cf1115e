"""Shape annotations shared by the package (jaxtyping; checked with beartype in the tests)."""

from collections.abc import Callable

from jaxtyping import Array, Float, Int, PRNGKeyArray  # noqa: F401

Activation = Callable[[Array], Array]
