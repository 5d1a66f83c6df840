"""Inference: predicting new scans and ranking unlabeled ones."""
