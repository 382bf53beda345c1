"""The registered recipes: one module per method family (importing it registers its recipes)."""

from . import beyond_labels  # noqa: F401  (registration)
