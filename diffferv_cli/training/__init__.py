"""Specialization fine-tuning (paper 3.2): data, the training loop, captioning."""
