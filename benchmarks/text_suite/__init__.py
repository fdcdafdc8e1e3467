"""Offline text benchmark suite: task data builder, fine-tuning and merge runner (see ``README.md`` here).

A package so that the tests can import ``benchmarks.text_suite.tasks`` and ``benchmarks.text_suite.run``, and
the demo the shared fine-tuning code.
"""
