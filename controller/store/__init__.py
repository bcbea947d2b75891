"""The registry of sandboxes behind a small protocol: all SQL lives here (SQLite by default;
the seam where PostgreSQL plugs in). Imports no grpc."""
