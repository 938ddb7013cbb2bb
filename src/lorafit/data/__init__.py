"""The data pipeline: read -> format -> render/tokenize/mask -> pack -> collate. See prepare.py."""
