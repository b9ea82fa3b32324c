"""bench: an nccl-tests style benchmark of comms against its peers (Gloo today).

Run it from the repository root::

    python -m bench                      # all_reduce, 8 B .. 64 MiB, 2 ranks, comms and gloo, 3 launches
    python -m bench -b 8 -e 1M -np 4 --launches 1

Modules:

* :mod:`bench.cli`      -- command line (nccl-tests flags) and the size sweep;
* :mod:`bench.driver`   -- runs each backend in fresh ``python -m comms.run`` launches, collects their JSON;
* :mod:`bench.worker`   -- the rank-side loop: warm-up, adaptive iteration count, timing, check;
* :mod:`bench.ops`      -- one class per collective: buffer layout, bus factor, exact check data;
* :mod:`bench.backends` -- one adapter per library (comms, gloo) with the same call surface;
* :mod:`bench.report`   -- aggregation over launches, the table, machine info, JSON dump.

See bench/README.md for what the columns mean and how the figures are measured.
"""

__version__ = "0.1.0"
