"""The stateless gateway: serves the public API and forwards each call, unparsed, to the petri
node that holds the sandbox (or places a new one)."""
