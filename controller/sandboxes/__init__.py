"""The domain: what a sandbox is, its lifecycle, the warm pool, executions, quotas and expiry.
Imports no grpc: it reaches containers and executors through controller.runtime and keeps
its records through controller.store."""
