"""The application layer: the `selavpr` command line and the HTTP service."""
