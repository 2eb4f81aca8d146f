"""vmemdev benchmarks (issue 7): `python -m bench [--quick] [--out DIR]`.

See BENCHMARKS.md at the top of the repository for what is measured, how,
and the latest results.
"""
