"""petri's controller: the public gRPC API, the sandbox registry and the container runtime.

It never runs user code: that happens in the executor inside each sandbox.
"""
