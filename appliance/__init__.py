"""hotsite: the appliance daemon at a call centre's disaster-recovery site."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hotsite")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
