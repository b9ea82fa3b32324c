"""bench: an nccl-tests style benchmark of comms against its peers (Gloo, and MPI when installed).

Run it from the repository root::

    python -m bench                      # all_reduce, 8 B .. 64 MiB, 2 ranks, comms, gloo, mpi, 3 launches
    python -m bench -b 8 -e 1M -np 4 --launches 1
    python -m bench --ops reduce,gather,scatter,sendrecv -np 3 -r 1 --json r.json --plot r.png

Modules:

* :mod:`bench.cli`      -- command line (nccl-tests flags) and the size sweep;
* :mod:`bench.driver`   -- runs each backend in fresh launches (``comms.run``, ``mpirun``), progress, exit status;
* :mod:`bench.worker`   -- the rank-side loop of a launch: ops and places, check, gathering the figures;
* :mod:`bench.measure`  -- the rank-side timing: buffer pool, warm-up, adaptive iteration count, timed loop;
* :mod:`bench.ops`      -- one class per op: buffer layout, in-place aliasing, bus factor, exact check data;
* :mod:`bench.backends` -- one adapter per library (comms, gloo, mpi): native modes, bindings; variants;
* :mod:`bench.report`   -- aggregation over launches, tables, A/B comparison, machine info, JSON, plot.

bench/schema.json describes the ``--json`` document.

See bench/README.md for what the columns mean and how the figures are measured.
"""

__version__ = "0.1.0"
