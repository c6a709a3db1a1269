"""The remote-storage testbed: namespaced S3 hosts with shaped links and fault injection."""
from .testbed import Testbed

__all__ = ["Testbed"]
