"""petri's executor: the daemon inside each sandbox, and the worker that holds the namespace.

The daemon (:mod:`executor.daemon`) is the container's entrypoint. It serves the Executor gRPC
service on a unix socket and supervises one worker process (:mod:`executor.worker`) that runs
user code; a crash or a hard kill of the worker loses that namespace, never the daemon.
The supervisor (:mod:`executor.supervisor`) runs each request as an
:class:`executor.execution.Execution`: its phases and the interrupt → kill ladder.
"""
