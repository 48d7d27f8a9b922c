"""Benchmarks of kvpeer against baselines measured in the same run.

- :mod:`kvpeer.bench.process`: a benchmark's server side in its own process;
- :mod:`kvpeer.bench.rows`: deterministic synthetic chunk rows and keys;
- :mod:`kvpeer.bench.rawtcp`: the raw TCP baseline (a sender process, a
  ``recv_into`` receiver);
- :mod:`kvpeer.bench.pull`: kvpeer's side: a peer server process and timed pulls;
- :mod:`kvpeer.bench.tier`: kvpeer's tier between two simulated vLLM node processes;
- :mod:`kvpeer.bench.p2p`: vLLM's built-in p2p tier between two such processes;
- :mod:`kvpeer.bench.netns`: a rate-limited veth link between two network namespaces;
- other modules measure other services (e.g. :mod:`kvpeer.bench.directory`).

The scripts under ``benchmarks/`` and ``kvpeer bench`` run them; numbers are
medians of interleaved repetitions, reported with the ratio to the baseline.
"""
