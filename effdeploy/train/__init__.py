"""Training from scratch, and SE reordering with distillation."""
