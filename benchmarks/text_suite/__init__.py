"""Offline text benchmark suite: builder of the task data (see ``README.md`` in this folder).

A package so that the tests can import the parsers as ``benchmarks.text_suite.tasks``.
"""
