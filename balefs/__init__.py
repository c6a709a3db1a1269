"""balefs: small files baled into chunks, striped over nodes, served as fsspec, FUSE, loaders and checkpoints."""
__version__ = "0.1.0"
