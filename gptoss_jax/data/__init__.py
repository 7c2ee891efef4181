"""Data: tokenizers, text sources, `prepare` (text -> tokens on disk) and grain pipelines."""
