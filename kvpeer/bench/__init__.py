"""Benchmarks of kvpeer against baselines measured in the same run.

- :mod:`kvpeer.bench.process`: a benchmark's server side in its own process;
- :mod:`kvpeer.bench.rows`: deterministic synthetic chunk rows and keys;
- :mod:`kvpeer.bench.rawtcp`: the raw TCP baseline (a sender process, a
  ``recv_into`` receiver);
- :mod:`kvpeer.bench.pull`: kvpeer's side: a peer server process and timed pulls;
- other modules measure other services (e.g. :mod:`kvpeer.bench.directory`).

The scripts under ``benchmarks/`` run them; numbers are medians of interleaved
repetitions, reported with the ratio to the baseline.
"""
