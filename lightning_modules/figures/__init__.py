"""Pictures of a model and of a verdict (matplotlib, imported only when drawing)."""
