"""The storage core: block codec, nodes, placement, chunk writer, block reader, metadata, client."""
from .client import Client, FileReader, FileWriter

__all__ = ["Client", "FileReader", "FileWriter"]
