"""The installed wattledger version, read from the package metadata."""

from importlib.metadata import PackageNotFoundError, version as _installed_version

try:
    VERSION = _installed_version("wattledger")
except PackageNotFoundError:  # running from a source tree that was never installed
    VERSION = "0.0.0+unknown"
