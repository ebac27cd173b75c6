"""The application layer: the `selavpr` command line and (later) the HTTP service."""
