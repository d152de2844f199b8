"""The error raised for bad input data (reported by `dsv4` as one line, without a traceback)."""


class DataError(ValueError):
  """Data that cannot be used: an empty corpus, a malformed document file, a broken tokenizer."""
