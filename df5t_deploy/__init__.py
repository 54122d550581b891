"""df5t-deploy: restore electron-microscopy images and volumes with DF5T."""

__version__ = "0.1.0"
