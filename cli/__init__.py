"""``fedgen``: the operator CLI, one room per concern.

* ``app``             the typer apps, the one error handler, which command is which function, ``main``
* ``options``         the arguments and options several commands share
* ``output``          consoles, JSON on stdout, the one-red-line error
* ``views``           rich tables and the status view (also its ``--json`` payload)
* ``plots``           the metrics figure of ``fedgen plot``
* ``read_commands``   commands that only read the run store (safe while the server writes)
* ``generate_commands``  ``generate``: synthetic data from a run's saved model (``server.run_model``)
* ``audit_commands``  commands that start work: audits, run through ``simulations/``

To add a command: write its function in the module of its kind, then name it in ``app``.
"""
