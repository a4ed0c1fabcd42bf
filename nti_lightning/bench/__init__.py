"""PIE-Bench: the field's benchmark of inversion-and-edit methods, read, edited and scored."""
