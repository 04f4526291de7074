"""Bundled search spaces (YAML), installed as `autoq.search_spaces`."""
