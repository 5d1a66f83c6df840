"""Data: the datalist, reading/writing images, preprocessing into cached arrays, training patches, and the synthetic
and real-anatomy tasks."""
