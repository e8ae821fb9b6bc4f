"""Running a method inside a model's decode: the accuracy simulator (`simulate`, dense PyTorch, the
reference) and, beside it, the offload runtime."""
