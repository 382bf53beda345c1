"""The registered recipes: one module per method family (importing it registers its recipes)."""

from . import beyond_labels, catseg, pixelclip, vilseg  # noqa: F401  (registration)
