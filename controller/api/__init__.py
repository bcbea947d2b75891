"""The public gRPC API: parse a request, authorise it, call the sandboxes layer, convert the
answer. No policy and no SQL here; imports go down only (sandboxes, store types, errors)."""
