"""Silo data: read raw files, clean them and write documents plus a data card (`prepare.py`),
then the shared tokenizer and token shards."""
