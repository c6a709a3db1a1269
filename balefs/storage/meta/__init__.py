"""The metadata of a volume: value types (types.py), the `Meta` contract (interface.py), the
SQL shared by the engines (sql.py), the engines (sqlite.py, postgres.py) and `open_meta`,
which picks an engine by URL scheme (registry.py). Importing this package imports no engine."""
from .interface import Meta
from .registry import open_meta, redact_url, register_engine
from .types import ROOT, AuditRow, BlockRecord, ChunkLayout, Extent, FileWrite, Inode, mode_bits, oserror, slices, split_path

__all__ = ["Meta", "open_meta", "redact_url", "register_engine", "ROOT", "AuditRow", "BlockRecord", "ChunkLayout", "Extent", "FileWrite",
           "Inode", "mode_bits", "oserror", "slices", "split_path"]
