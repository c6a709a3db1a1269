"""The remote-storage testbed: namespaced S3 hosts with shaped links and fault injection."""
from .testbed import Testbed, wait_until

__all__ = ["Testbed", "wait_until"]
