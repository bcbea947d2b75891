"""What runs sandboxes: the container-runtime protocol with podman (and gVisor) behind it, and
the client of each sandbox's executor, which turns gRPC statuses into domain errors."""
