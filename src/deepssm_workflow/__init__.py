"""DeepSSM workflow: statistical shape models predicted from unsegmented 3D images."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("deepssm-workflow")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0+unknown"
